"""The web UI: generation engine, A1111-compatible API, page, auth and launching."""
