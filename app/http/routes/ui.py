"""GET /: a small page to try the service (upload, labels, mask, member votes, live latency chart), and its files.

Everything the page needs is served from here (app/static), so it works offline; its Content-Security-Policy
forbids loading anything from elsewhere.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException, Response

router = APIRouter(include_in_schema=False)

# The files the page may load, and their types; nothing else under app/static is served.
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PAGE = "index.html"
# The uploaded picture is shown from a blob: URL, the mask from a data: URL; the rest comes from this origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@cache
def read_static(name: str) -> bytes:
    """One file of app/static, read once (it is part of the installed package)."""
    return resources.files("app.http").joinpath("static", name).read_bytes()


@router.get("/")
async def page() -> Response:
    headers = {**HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY}
    return Response(read_static(PAGE), media_type="text/html; charset=utf-8", headers=headers)


@router.get("/static/{name}")
async def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static file {name!r}")
    return Response(read_static(name), media_type=media_type, headers=HEADERS)
