"""`/docs` and `/redoc` work on a machine with no network: every script, stylesheet and icon
they load is served by the app itself (fastapi-offline's assets), none comes from a CDN."""

from __future__ import annotations

import re
import socket
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.conftest import serve_in_thread


@pytest.fixture
def no_network(monkeypatch):
    """Sockets may connect to loopback only: anything else raises, as on an offline machine."""
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"network is unreachable (test): {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def docs_server(tmp_path, no_network):
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    kb = KnowledgeBase(Settings(home=tmp_path / "home"))
    with serve_in_thread(create_app(kb, warm=False, ui=False)) as url:
        yield url


def _assets(html: str) -> list[str]:
    """The URLs a page loads by itself: script sources, stylesheets, icons."""
    return re.findall(r'<script[^>]+src="([^"]+)"', html) + re.findall(
        r'<link[^>]+href="([^"]+)"', html
    )


@pytest.mark.parametrize("page, marker", [("/docs", "SwaggerUIBundle"), ("/redoc", "<redoc")])
def test_docs_page_and_its_assets_come_from_the_app(docs_server, page, marker):
    with httpx.Client(base_url=docs_server, timeout=30) as client:
        r = client.get(page)
        assert r.status_code == 200 and marker in r.text
        assets = _assets(r.text)
        assert any(a.endswith(".js") for a in assets), assets
        for a in assets:
            url = urljoin(docs_server + page, a)
            assert urlsplit(url).netloc == urlsplit(docs_server).netloc, (
                f"{page} loads {a} from elsewhere"
            )
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, (a, asset.status_code)
        spec = client.get("/openapi.json")
        assert spec.status_code == 200 and "/v1/chat/completions" in spec.json()["paths"]


def test_the_network_guard_refuses_other_hosts(no_network):
    with pytest.raises(OSError, match="unreachable"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
