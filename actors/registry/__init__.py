"""The registry client of the images process: references, hosts, auth, and the OCI distribution API."""
