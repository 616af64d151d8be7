"""The admin HTTP server: JSON API, status page, /metrics, /healthz."""
