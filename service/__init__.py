"""alora-serve's HTTP layer: a thin FastAPI service over `alora_core.Engine` (see README "HTTP API")."""
