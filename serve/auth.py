"""The API key: with one set, the API answers only clients that send ``Authorization: Bearer <key>``.

As vLLM and the OpenAI clients expect: every route but ``/health`` (and the web UI, which
asks for the same key through Gradio's own login page) answers 401 in OpenAI's error shape
without the right key. The key is compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import ServeError

LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


def key_matches(given: str | bytes, key: str) -> bool:
    """``given == key`` (``given`` as text or as the UTF-8 bytes a header carried), in constant time."""
    given = given.encode("utf-8") if isinstance(given, str) else given
    return hmac.compare_digest(given, key.encode("utf-8"))


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, port: int, api_key: str | None) -> str | None:
    """The warning to print when the server binds beyond this machine without a key; None when safe."""
    if api_key or is_loopback(host):
        return None
    return (
        f"warning: serving on {host}:{port} without an API key: anyone who can reach this address can use "
        "the model, the API and the web UI. Set --api-key or the PHICLIP_API_KEY environment variable."
    )


class ApiKeyMiddleware:
    """ASGI middleware refusing requests without ``Authorization: Bearer <key>``, except on open paths.

    ``open_paths``: exact paths served to anyone (``/health``); ``open_prefixes``: path prefixes
    left to the app mounted there (the web UI, which has its own login).
    """

    def __init__(
        self, app: ASGIApp, key: str, open_paths: tuple[str, ...] = (), open_prefixes: tuple[str, ...] = ()
    ) -> None:
        if not key:
            raise ValueError("the API key is empty")
        self.app = app
        self.key = key
        self.open_paths = open_paths
        self.open_prefixes = open_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        error = ServeError(problem, 401, "invalid_request_error", None, "invalid_api_key")
        response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or any(
            path == prefix or path.startswith(prefix + "/") for prefix in self.open_prefixes
        )

    def _problem(self, scope: Scope) -> str | None:
        """None when the request carries the key, else what is wrong with it."""
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if not values:
            return "this server needs an API key: send the header 'Authorization: Bearer <key>'"
        scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the Authorization header must read 'Bearer <key>'"
        if not key_matches(token.strip().encode("latin-1"), self.key):  # the header's own bytes
            return "the API key is not valid"
        return None
