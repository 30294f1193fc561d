"""`GET /openapi.json` (the document edge/openapi.py builds) and `GET /docs`, the API reference
page rendered from it by Redoc, served whole by the edge so it works offline.

edge/static/ holds Redoc's standalone bundle as published in the `redoc` npm package, version
2.5.4, unmodified (`bundles/redoc.standalone.js`, with its license and the licenses of what it
bundles). To update it: `npm pack redoc@VERSION`, copy the same three files, and run
tests/test_openapi.py, which renders the page in headless Chromium.

The page's Content-Security-Policy lets it load nothing from anywhere but this edge: Redoc's
sidebar would show a logo from Redocly's CDN, and the policy keeps that request from being
made (Redoc then leaves the logo out).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

from edge import openapi
from edge.keys import SETTINGS

routes = web.RouteTableDef()

BUNDLE = "redoc.standalone.js"
# The bundle's first line names this file for the licenses of the code it bundles.
ASSETS = {
    BUNDLE: "text/javascript",
    f"{BUNDLE}.LICENSE.txt": "text/plain",
    "redoc.LICENSE": "text/plain",
}

# Redoc renders with styled-components (inline <style>) and runs its search index in a worker
# made from a blob: URL; everything else comes from this origin.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>payonce API reference</title>
<link rel="icon" href="data:,">
<style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
<redoc spec-url="/openapi.json" native-scrollbars></redoc>
<script src="/docs/{BUNDLE}"></script>
</body>
</html>
"""


@cache
def asset(name: str) -> bytes:
    return resources.files("edge").joinpath("static", name).read_bytes()


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    body = openapi.document_bytes(request.app[SETTINGS].max_body_bytes)
    return web.Response(body=body, content_type="application/json")


@routes.get("/docs")
async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html",
                        headers={"Content-Security-Policy": CSP})


@routes.get("/docs/{name}")
async def docs_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    # The assets change only with a new release of payonce.
    return web.Response(body=asset(name), content_type=ASSETS[name], charset="utf-8",
                        headers={"Cache-Control": "public, max-age=3600"})
