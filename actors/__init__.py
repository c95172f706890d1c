"""moord.actors."""
