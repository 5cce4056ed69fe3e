"""The aiohttp v2 server: `create_app(config, engine=None)` and `serve(config)` (see app.py)."""
from vibrato.server.app import create_app, serve

__all__ = ["create_app", "serve"]
