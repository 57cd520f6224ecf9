"""In-process servers: the `start_app` fixture's type (tests/integration/conftest.py builds it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from server.app import App

AppFactory = Callable[..., Awaitable[App]]
"""`await start_app(models=..., config=..., server={...}, **model_overrides)` -> a started App."""
