"""moord.messages."""
