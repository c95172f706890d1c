"""The registry client of the images process: hosts, auth, and the OCI distribution API (references: moord.oci.reference)."""
