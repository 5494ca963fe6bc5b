"""The dashboard at /ui: one page shell and its scripts, which speak only the public REST and
WebSocket API with the user's own token (kept in the browser's sessionStorage).

Nothing here reads the store or the services: a page shows what the token may see, and a
viewer's token can change nothing because the API refuses it, whatever the page shows.
The third-party modules (xterm.js) are copied into ``static/vendor`` by ``make ui`` from the
npm lockfile in ``web/``; they ship in the Python package.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

__all__ = ["STATIC", "mount"]

log = logging.getLogger("multiverse.master")

STATIC = Path(__file__).parent / "static"
VENDOR_FILES = ("xterm.js", "xterm.css", "addon-fit.js")
# The page runs only our own scripts; it talks only to its own origin (https and wss), and no
# other site may frame it. xterm.js writes <style> elements, hence 'unsafe-inline' for styles.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _Static(StaticFiles):
    """Static files with the dashboard's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def built() -> bool:
    return all((STATIC / "vendor" / name).is_file() for name in VENDOR_FILES)


def mount(app: FastAPI) -> None:
    """Add /ui (every path under it is the same page; its script routes) and /ui/static."""
    if not built():
        log.warning("the dashboard's assets are missing; `make ui` builds them")
    app.mount("/ui/static", _Static(directory=STATIC, check_dir=False), name="ui-static")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/{page:path}", include_in_schema=False)
    async def page(page: str = "") -> Response:
        if not built():
            return JSONResponse(
                {
                    "error": {
                        "code": "unavailable",
                        "message": "the dashboard's assets are not built: run `make ui`",
                    }
                },
                status_code=503,
            )
        return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)
