"""moord.supervisor."""
