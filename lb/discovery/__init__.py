"""Sources of desired peer sets: static config, Consul, the admin API."""
