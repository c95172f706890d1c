"""moord.bus."""
