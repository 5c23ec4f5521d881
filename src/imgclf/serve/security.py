"""Who may call the API and what browsers may do with the answers: the optional API key
(compared in constant time), hardening headers on every response, the page's CSP."""

import hmac

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from imgclf.serve.errors import ApiError

API_KEY_HEADER = "X-API-Key"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="needed when the server was started with --api-key")


async def check_key(request: Request, key: str | None = Security(api_key_header)):
    """Route dependency: pass when the server has no key (``app.state.config.api_key``), else
    401 unless the header carries exactly that key."""
    api_key = request.app.state.config.api_key
    if not api_key:
        return
    if not key:
        raise ApiError(401, "missing-api-key", f"this server needs an API key in the {API_KEY_HEADER} header", {"WWW-Authenticate": "ApiKey"})
    try:
        provided = key.encode("latin-1")  # the header's raw bytes (HTTP headers arrive latin-1 decoded)
    except UnicodeEncodeError:
        provided = b""
    if not hmac.compare_digest(provided, api_key.encode("utf-8")):
        raise ApiError(401, "wrong-api-key", f"wrong API key in the {API_KEY_HEADER} header", {"WWW-Authenticate": "ApiKey"})


class SecurityHeaders:
    """Pure ASGI middleware (does not buffer bodies): hardening headers on every answer, and no
    body on answers to HEAD (uvicorn drops it too; this keeps the app right under any server)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        head_only = scope.get("method") == "HEAD"

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")):
                    if k not in names:
                        headers.append((k, v))
                if scope.get("path", "").startswith("/v1/") and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and head_only and message.get("body"):
                message = {**message, "body": b""}  # HEAD: GET's headers (Content-Length included), no body
            await send(message)

        await self.app(scope, receive, send_with_headers)
