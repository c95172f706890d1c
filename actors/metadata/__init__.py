"""moord.actors.metadata."""
