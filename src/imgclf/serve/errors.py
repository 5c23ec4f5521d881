"""The one error shape of the API: ``{"error": {"code", "message"}}``, for our own refusals,
Starlette's 404/405, request validation and anything unexpected (never a traceback); a client
that hangs up mid-request is one log line, not an error."""

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("imgclf")


class ApiError(Exception):
    """Becomes ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, " ".join(str(message).split()), headers or {}


def error_json(status: int, code: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _api_error(request, exc: ApiError):
    return error_json(exc.status, exc.code, exc.message, exc.headers)


async def _http_error(request, exc):
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    return error_json(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request, exc):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()))
    return error_json(422, "invalid-request", f"{where}: {first.get('msg', 'invalid request')}")


async def _client_gone(request, exc):
    """The client closed the connection before sending its whole request (a cancelled upload,
    a closed tab, a timed-out slow client): an everyday event, worth one line, not a traceback.
    Nobody reads the answer; the status only keeps the ASGI exchange complete."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
    log.info("%s %s: %s disconnected before the request was complete; request dropped", request.method, request.url.path, client)
    return error_json(400, "client-disconnected", "the client disconnected before the request was complete")


async def _internal_error(request, exc):
    log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
    return error_json(500, "internal", "internal server error; see the server log")


def install_error_handlers(app) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal_error)
