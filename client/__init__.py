"""moord.client."""
