"""Playwright on Debian's Chromium for the browser tests: launch, sign in, watch for trouble.

Never downloads a browser: without /usr/bin/chromium the browser tests skip, or fail under CI.
Playwright's async API, because its sync API keeps an event loop marked as running between calls,
which the project's async autouse fixtures cannot live with. Test modules run on a module-scoped
loop (`pytest.mark.asyncio(loop_scope="module")`) so that they share one browser; they import
`browser_fixture` and `open_tab_fixture`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest_asyncio
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import Client

from tests.factories import PASSWORD
from tests.services import service_unavailable

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}

# Runs in every page before its own scripts: records CSP violations as the page sees them,
# counts ticket requests (synchronously, so a test can ask "has it tried again?" at any moment),
# and records what live regions would give a screen reader to say: the text of every node added
# inside one (aria-relevant="additions", the default), unless the region is aria-live="off" or
# busy, or the node hidden. A model of the ARIA rules, not a screen reader.
WATCH_SCRIPT = """
window.__heard = [];
const IMPLICIT_LIVE = { log: "polite", status: "polite", alert: "assertive" };
function heardIn(node) {
  for (let el = node instanceof Element ? node : null; el; el = el.parentElement) {
    if (el.hidden || el.getAttribute("aria-hidden") === "true") return false;
    if (el.getAttribute("aria-busy") === "true") return false;
    const live = el.getAttribute("aria-live") ?? IMPLICIT_LIVE[el.getAttribute("role")];
    if (live) return live !== "off";
  }
  return false;
}
new MutationObserver((records) => {
  for (const record of records) {
    for (const node of record.addedNodes) {
      const text = (node.textContent ?? "").trim();
      if (text && heardIn(record.target)) window.__heard.push(text);
    }
  }
}).observe(document, { childList: true, subtree: true });
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(`${e.effectiveDirective} ${e.blockedURI}`);
});
window.__ticketRequests = 0;
const originalFetch = window.fetch;
window.fetch = function (input, init) {
  if (String(input instanceof Request ? input.url : input).includes("/api/tickets/")) {
    window.__ticketRequests += 1;
  }
  return originalFetch.call(this, input, init);
};
"""


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = (
        f"{CHROMIUM} is missing: install Debian's chromium "
        "(DEBIAN_FRONTEND=noninteractive apt-get install -y chromium) to run the browser tests"
    )
    service_unavailable(reason)


# Fixtures under their own names: a test module imports these, and its tests ask for `browser`
# and `open_tab`.
@pytest_asyncio.fixture(scope="module", loop_scope="module", name="browser")
async def browser_fixture():
    """One headless Chromium per test module; each test opens its own contexts."""
    require_chromium()
    from playwright.async_api import async_playwright, expect

    # Waits for conditions, never a timed assertion: generous for slow CI machines.
    expect.set_options(timeout=15_000)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        await chromium.close()


@dataclass
class Tab:
    """A page in its own browser context (its own cookies), and everything that went wrong in it."""

    page: object
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    frames_sent: list[dict] = field(default_factory=list)

    async def csp_violations(self) -> list[str]:
        seen = await self.page.evaluate("window.__csp || []")
        return seen + [m for m in self.console_errors if "Content Security Policy" in m]

    async def ticket_requests(self) -> int:
        return await self.page.evaluate("window.__ticketRequests")

    async def heard(self, containing: str = "") -> list[str]:
        """What live regions gave to say so far (WATCH_SCRIPT): the lines with `containing`."""
        heard = await self.page.evaluate("window.__heard")
        return [text for text in heard if containing in text]


@pytest_asyncio.fixture(loop_scope="module", name="open_tab")
async def open_tab_fixture(browser):
    """await open_tab(server, viewport=..., clock=...) -> Tab; contexts close after the test."""
    contexts = []

    async def open_(server, *, viewport: dict | None = None, clock: bool = False) -> Tab:
        context = await browser.new_context(
            base_url=server.url,
            viewport=viewport or DESKTOP,
            locale="en-US",
            timezone_id="UTC",
            reduced_motion="reduce",  # no transitions: what is visible is where it will stay
        )
        contexts.append(context)
        await context.add_init_script(WATCH_SCRIPT)
        page = await context.new_page()
        if clock:
            await page.clock.install()
        tab = Tab(page)

        def on_console(message):
            if message.type == "error":
                tab.console_errors.append(message.text)

        async def on_dialog(dialog):
            tab.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("console", on_console)
        page.on("pageerror", lambda error: tab.page_errors.append(str(error)))
        page.on("dialog", on_dialog)

        def on_websocket(ws):
            tab.sockets.append(ws.url)
            ws.on("framesent", lambda payload: tab.frames_sent.append(json.loads(payload)))

        page.on("websocket", on_websocket)
        return tab

    yield open_
    for context in contexts:
        await context.close()


@functools.cache
def _session_for(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def sign_in_fast(tab: Tab, server, user) -> None:
    """A session made in the database, as force_login does: for tests that are not about signing
    in (the sign-in form has its own test, and PBKDF2 costs half a second per login)."""
    session = await sync_to_async(_session_for)(user)
    await tab.page.context.add_cookies(
        [{"name": settings.SESSION_COOKIE_NAME, "value": session, "url": server.url}]
    )


async def sign_in(tab: Tab, username: str, *, password: str = PASSWORD) -> None:
    """Through the sign-in form."""
    from playwright.async_api import expect

    page = tab.page
    await page.goto("/login/")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("button", name="Sign out")).to_be_visible()


async def open_room(tab: Tab, slug: str) -> None:
    """Go to a room and wait until its socket has said hello and its history is in."""
    from playwright.async_api import expect

    await tab.page.goto(f"/rooms/{slug}/")
    await expect(tab.page.locator("#status")).to_have_attribute("data-state", "open")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")


async def send(tab: Tab, text: str) -> None:
    composer = tab.page.locator("#composer-input")
    await composer.fill(text)
    await composer.press("Enter")


async def message_bodies(tab: Tab) -> list[str]:
    return await tab.page.locator("#messages > li .body").all_text_contents()


async def message_seqs(tab: Tab) -> list[int]:
    seqs = await tab.page.locator("#messages > li").evaluate_all(
        "items => items.map(li => Number(li.dataset.seq))"
    )
    return list(seqs)


async def assert_healthy(*tabs: Tab) -> None:
    """Nothing ran that should not have: no dialog, no uncaught error, no CSP violation."""
    for tab in tabs:
        assert tab.dialogs == []
        assert tab.page_errors == []
        assert await tab.csp_violations() == []
