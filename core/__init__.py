"""The host: hooks, plugin manager, assembly, app and serving. Knows no concrete framework or cloud."""
