"""moord.config: the daemon's TOML configuration."""
