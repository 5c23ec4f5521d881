"""``/docs``: Swagger UI for the server's OpenAPI document, working offline. FastAPI's own docs
page loads Swagger UI from a CDN (and is blank without internet) and starts it with an inline
script; here the page, its start-up script and Swagger UI's files all come from this server
(Swagger UI's from the installed ``fastapi-offline`` package), so the page's CSP allows only
'self'."""

import hashlib
from functools import lru_cache
from importlib.resources import files as package_files

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from imgclf.serve.errors import ApiError

DOCS_URL = "/docs"
DOCS_ASSETS_URL = "/docs/assets"
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# name under /docs/assets/ → (package, file in it, content type)
DOCS_ASSETS = {
    "swagger-ui-bundle.js": ("fastapi_offline", "static/swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("fastapi_offline", "static/swagger-ui.css", "text/css; charset=utf-8"),
    "favicon.png": ("fastapi_offline", "static/favicon.png", "image/png"),
    "docs.js": ("imgclf.serve", "web/docs.js", "text/javascript; charset=utf-8"),
}


@lru_cache(maxsize=1)
def load_docs_assets() -> dict[str, tuple[bytes, str, str]]:
    """name → (bytes, content type, ETag), read once per process (Swagger UI is ~1.7 MB)."""
    assets = {}
    for name, (package, path, ctype) in DOCS_ASSETS.items():
        data = package_files(package).joinpath(path).read_bytes()
        assets[name] = (data, ctype, '"' + hashlib.sha256(data).hexdigest()[:32] + '"')
    return assets


@lru_cache(maxsize=1)
def docs_page() -> bytes:
    return (package_files("imgclf.serve") / "web" / "docs.html").read_bytes()


async def docs(request: Request):
    return HTMLResponse(docs_page(), headers={"Content-Security-Policy": DOCS_CSP, "Cache-Control": "no-cache"})


async def docs_asset(request: Request, name: str):
    """One of :data:`DOCS_ASSETS`; revalidated by ETag (304 when the browser has this copy)."""
    if name not in DOCS_ASSETS:
        raise ApiError(404, "not-found", "no such file")
    data, ctype, etag = load_docs_assets()[name]
    headers = {"Cache-Control": "no-cache", "ETag": etag}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=ctype, headers=headers)
