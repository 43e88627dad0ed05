"""Pages as an offline user sees them: headless Chromium with every non-loopback host blocked.

`render_offline(url)` returns the DOM after the page's scripts ran (`--dump-dom`): a page that
needs a CDN renders without its content, and a script that inserts a third-party tag shows up
in it. `remote_resources(html)` lists what a page would load from a non-local http(s) URL
(scripts, stylesheets, images, frames, CSS `url()` and `@import`); links a user may click are
not loads and are not listed.

Chromium comes from Debian (`apt-get install chromium`; .ci/run installs it). Without it the
browser tests skip, saying so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest

CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
RENDER_TIMEOUT_S = 60
# Attributes that make a browser fetch something, by tag (<a href> is a link, not a load).
_LOADING_ATTRIBUTES = {
    "script": ("src",),
    "link": ("href",),
    "img": ("src", "srcset"),
    "iframe": ("src",),
    "frame": ("src",),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "input": ("src",),
}
_CSS_URL = re.compile(r"""(?:url\(|@import\s+)\s*['"]?(https?://[^'")\s]+)""", re.IGNORECASE)


def _is_remote(url: str) -> bool:
    parts = urlsplit(url.strip())
    return parts.scheme in ("http", "https") or (parts.scheme == "" and url.startswith("//"))


def _is_local(url: str) -> bool:
    return urlsplit(url.strip()).hostname in LOCAL_HOSTS


class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in: str | None = None  # "script" or "style" while inside one

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in = tag if tag in ("script", "style") else None
        for name, value in attrs:
            if value is None:
                continue
            if name in _LOADING_ATTRIBUTES.get(tag, ()):
                self.urls += [part.split()[0] for part in value.split(",") if part.strip()]
            elif name == "style":
                self.urls += _CSS_URL.findall(value)

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "style":
            self.urls += _CSS_URL.findall(data)
        elif self._in == "script":  # a URL in a string of a script is a load waiting to happen
            self.urls += re.findall(r"""['"](https?://[^'"\s]+)['"]""", data)


def remote_resources(html: str) -> list[str]:
    """The non-local http(s) URLs the page would load (see the module docstring)."""
    parser = _Resources()
    parser.feed(html)
    return [url for url in parser.urls if _is_remote(url) and not _is_local(url)]


def render_offline(url: str) -> str:
    """The DOM of `url` after its scripts ran, in headless Chromium with no network but loopback.

    Name resolution fails for every host but 127.0.0.1, and every proxied request goes to a
    closed loopback port, so nothing off this machine can answer.
    """
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        completed = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--proxy-server=http://127.0.0.1:9",
                "--allow-file-access-from-files",
                "--virtual-time-budget=5000",  # let onload handlers and fetches finish
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=RENDER_TIMEOUT_S,
            check=False,
        )
    if completed.returncode != 0 or not completed.stdout.strip():
        tail = completed.stderr[-2000:]
        raise AssertionError(f"chromium could not render {url} ({completed.returncode}): {tail}")
    return completed.stdout
