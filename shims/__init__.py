"""moord.shims."""
