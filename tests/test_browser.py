"""The web app in a real headless Chromium (Debian's, driven by Playwright): sign in, upload a
document, wait until it is ready, ask what only it says, see the streamed answer and its
citation; as admin evict the corpus and see its state change; a non-admin sees no Admin tab.

Skips without /usr/bin/chromium, except under CI, where `.ci/run` installs it and a missing
browser fails. Set KB_UI_SCREENSHOTS=docs to refresh the README's screenshots.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import MODELS_DIR, serve_in_thread

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
FACT = "The lighthouse of Brannock Point was built in 1873.\n\nIts keeper, Ida Morrow, logged every storm."
QUESTION = "When was the lighthouse of Brannock Point built?"


def _browser_or_skip():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing under CI (.ci/run installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    return pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def site(tmp_path_factory, demo_model_dir):
    from kb.auth import create_user
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    _browser_or_skip()
    root = tmp_path_factory.mktemp("browser")
    kb = KnowledgeBase(
        Settings(home=root / "home", models_dir=MODELS_DIR, auth="on", max_tokens=24)
    )
    create_user(kb.db, "root", "pw-root-123", admin=True)
    create_user(kb.db, "ann", "pw-ann-1234")
    with serve_in_thread(create_app(kb, warm=False)) as url:
        yield {"url": f"{url}/", "kb": kb, "root": root}
    kb.close()


@pytest.fixture(scope="module")
def browser(site):
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def sign_in(browser, site, name: str, password: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(120_000)
    page.goto(site["url"])
    assert page.url.endswith("/login")  # auth on: the sign-in page comes first
    page.fill("#name", name)
    page.fill("#password", password)
    page.click("#signin")
    page.wait_for_selector("#whoami >> text=signed in as")
    return page


def shot(page, site, name: str) -> None:
    folder = os.environ.get("KB_UI_SCREENSHOTS")
    page.screenshot(path=str(Path(folder or site["root"]) / f"ui-{name}.png"), full_page=True)


def test_upload_ask_cite_evict(browser, site):
    from playwright.sync_api import expect

    page = sign_in(browser, site, "root", "pw-root-123")
    expect(page.get_by_role("tab", name="Admin")).to_be_visible()

    # Corpora: create, drop a file, wait for ready
    page.get_by_role("tab", name="Corpora").click()
    page.fill("#new-corpus-name textarea, #new-corpus-name input", "lighthouse")
    page.get_by_label("public").check()
    page.click("#create-corpus")
    expect(page.locator("#corpora-status")).to_contain_text("created corpus lighthouse")
    doc = site["root"] / "brannock.txt"
    doc.write_text(FACT)
    page.locator("#upload input[type=file]").set_input_files(str(doc))
    expect(page.locator("#corpora-status")).to_contain_text("1 file(s)")
    expect(page.locator("#documents")).to_contain_text("brannock.txt")
    expect(page.locator("#documents")).to_contain_text("ready", timeout=300_000)
    expect(page.locator("#corpus-summary")).to_contain_text("lighthouse: ready")
    shot(page, site, "corpora")

    # Chat: pick the corpus, ask, watch the answer stream in, open its citation
    page.get_by_role("tab", name="Chat").click()
    picker = page.locator("#chat-corpus input")
    picker.click()
    page.get_by_role("option", name="lighthouse").click()
    page.fill("#question textarea", QUESTION)
    page.click("#send")
    bot = page.locator("#chatbot")
    expect(bot).to_contain_text("1873", timeout=300_000)
    expect(bot).to_contain_text("brannock.txt", timeout=120_000)
    bot.get_by_text(re.compile(r"\[1\] brannock\.txt")).first.click()  # expand the citation
    expect(bot.locator("mark").first).to_be_visible()
    expect(bot.locator("mark").first).to_contain_text("1873")
    shot(page, site, "chat")

    # Admin: the corpus is loaded (ready); evict it and see the state change
    page.get_by_role("tab", name="Admin").click()
    table = page.locator("#admin-corpora")
    expect(table).to_contain_text("lighthouse")
    row = table.locator("tr", has_text="lighthouse")
    expect(row).to_contain_text("ready")
    page.locator("#admin-corpus input").click()
    page.get_by_role("option", name="lighthouse").click()
    page.click("#admin-evict")
    expect(page.locator("#admin-status")).to_contain_text("evict")
    expect(row).to_contain_text("evicted")
    expect(page.locator("#engine-figures")).to_contain_text("tokens/s", timeout=30_000)
    shot(page, site, "admin")
    page.close()


def test_non_admin_sees_no_admin_tab(browser, site):
    from playwright.sync_api import expect

    page = sign_in(browser, site, "ann", "pw-ann-1234")
    expect(page.get_by_role("tab", name="Chat")).to_be_visible()
    expect(page.get_by_role("tab", name="Corpora")).to_be_visible()
    expect(page.get_by_role("tab", name="Admin")).to_have_count(0)
    page.close()
