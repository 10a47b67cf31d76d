"""ASGI middleware around every route: access log, CORS, API keys, the body cap (app.py orders them)."""
