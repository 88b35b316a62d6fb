"""The one exception the server turns into a client-facing error.

Every problem with a request is raised as :class:`ServeError` with a message that names
the problem. The API renders it OpenAI style (``{"error": {"message", "type", ...}}``) with
its HTTP status; the web UI shows the same message. Anything else is an internal error:
logged on the server, answered with a generic 500 and never a stack trace.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeError(Exception):
    message: str
    status: int = 400
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ServeError:
    return ServeError(message, 400, "invalid_request_error", param, code)


def too_large(message: str, param: str | None = None) -> ServeError:
    return ServeError(message, 413, "invalid_request_error", param, "payload_too_large")


def unsupported(message: str, param: str | None = None) -> ServeError:
    return ServeError(message, 415, "invalid_request_error", param, "unsupported_media_type")


def unprocessable(message: str, param: str | None = None, code: str | None = None) -> ServeError:
    """Well-formed input the model cannot use: silent audio, a prompt longer than the context."""
    return ServeError(message, 422, "invalid_request_error", param, code)


def busy(message: str) -> ServeError:
    return ServeError(message, 503, "server_busy", None, "queue_full")
