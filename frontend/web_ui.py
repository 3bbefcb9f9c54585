"""The web chat page: a few static files shipped inside the package (frontend/webui/), served at
``/`` and ``/ui/<name>``.

The page is plain HTML, CSS and one script: no build step, nothing fetched from elsewhere. It
talks to this server's own API from the same origin, so it needs no CORS and obeys the same
access rules as any other client (it asks for the API key itself). The files are read from disk
on each request, so the front end holds none of them in memory while nobody opens the page.

Every answer carries a Content-Security-Policy that allows scripts, styles and requests from this
origin only and no inline script: even if a model's reply reached the page's HTML, it could not run.
"""

from __future__ import annotations

from pathlib import Path

from werkzeug.exceptions import NotFound
from werkzeug.wrappers import Request, Response

ASSET_DIR = Path(__file__).resolve().parent / "webui"
PAGE = "index.html"
ICON = "icon.svg"  # also answered at /favicon.ico, which browsers ask for on their own
ASSETS = {  # every file the page is made of, with its media type
    PAGE: "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    ICON: "image/svg+xml",
}
# The paths answered without an API key: the page must load before it can ask for one.
PUBLIC_PATHS = frozenset({"/", "/favicon.ico", *(f"/ui/{name}" for name in ASSETS)})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) on each load: an upgraded server serves its new page
}


def asset_response(request: Request, name: str) -> Response:
    """One of the page's files, with its ETag (a 304 when the browser's copy is current); any other
    name is a 404."""
    if name not in ASSETS:
        raise NotFound()
    response = Response((ASSET_DIR / name).read_bytes(), content_type=ASSETS[name], headers=SECURITY_HEADERS)
    response.add_etag()
    return response.make_conditional(request)
