"""The one error shape of the API: ``{"error": {"code", "message"}}``, for our own refusals,
Starlette's 404/405, request validation and anything unexpected (never a traceback)."""

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


async def _internal_error(request, exc):
    log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
    return error_json(500, "internal", "internal server error; see the server log")


def install_error_handlers(app) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
