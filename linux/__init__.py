"""moord.linux."""
