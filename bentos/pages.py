"""The service's index page (`GET /`): Swagger UI from the files BentoML ships, nothing remote.

BentoML's own index page embeds Google Tag Manager (a third-party script, and a request to
Google from every browser that opens the docs) and links to GitHub. This page loads only
`./static_content/` (the Swagger UI bundle BentoML serves from its package) and
`./docs.json`, and turns off Swagger UI's online validator badge, which would fetch an image
from validator.swagger.io. So the page renders the same offline and tells no one it was opened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

INDEX_HTML = """\
<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>textgate API</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="./static_content/index.css" />
    <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script>
      window.onload = function () {
        window.ui = SwaggerUIBundle({
          url: "./docs.json",
          dom_id: "#swagger-ui",
          deepLinking: true,
          validatorUrl: null,
          presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
          plugins: [SwaggerUIBundle.plugins.DownloadUrl],
          layout: "StandaloneLayout",
        });
      };
    </script>
  </body>
</html>
"""
_BODY = INDEX_HTML.encode("utf-8")
_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-length", str(len(_BODY)).encode("ascii")),
]


class LocalIndexMiddleware:
    """Answer `GET /` and `HEAD /` with INDEX_HTML; pass every other request on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_index = scope["type"] == "http" and scope["path"] == "/"
        if not is_index or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        body = b"" if scope["method"] == "HEAD" else _BODY
        await send({"type": "http.response.body", "body": body})
