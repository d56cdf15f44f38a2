"""The ASGI application: middleware, error mapping, probes, and every context's routes."""

from mercato.gateway.app import create_app

__all__ = ["create_app"]
