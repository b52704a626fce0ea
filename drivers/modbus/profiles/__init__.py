"""Register maps of meter models, one TOML data file per model (see docs/profiles.md)."""
