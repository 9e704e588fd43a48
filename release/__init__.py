"""Building and verifying release bundles."""
