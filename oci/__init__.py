"""moord.oci."""
