"""Helpers for the page tests: a headless Chromium per test, and the page's cards as a user sees
them (question, stage, status line, sources, answer, error)."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest

from browser import CHROMIUM, Browser, BrowserError

QUESTION, ASK = "[data-testid=question]", "[data-testid=ask]"
FINAL = ("done", "length", "cancelled", "error")
ANSWERED = ("done", "length")  # ended by the model or by max_tokens
ARTIFACTS = Path(os.environ.get("EDGEKB_TEST_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "test-artifacts"))

# Every card in page order (oldest first), as the user sees it.
CARDS = """[...document.querySelectorAll('#cards > .card')].map(c => {
  const st = c.querySelector('[data-testid=status]');
  return {id: c.dataset.id, question: c.querySelector('h2').textContent,
          stage: st.dataset.stage || '', status: c.querySelector('.st-text').textContent,
          sources: [...c.querySelectorAll('[data-testid=sources] > li summary')]
            .map(s => s.textContent),
          answer: c.querySelector('[data-testid=answer]').textContent,
          error: [...c.querySelectorAll('.err')].map(e => e.textContent).join(' ')};
})"""


async def launch(tmp_path: Path, name: str = "chromium") -> Browser:
    if not CHROMIUM.exists():
        if os.geteuid() == 0:
            pytest.fail(f"{CHROMIUM} is missing; scripts/test installs it (apt-get install "
                        "chromium)")
        pytest.skip(f"{CHROMIUM} is missing and installing it needs root")
    return await Browser.launch(tmp_path / name)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    b = await launch(tmp_path)
    try:
        yield b
    finally:
        await b.close()


@dataclass(frozen=True)
class Login:
    """What a page login leaves in a browser: the HttpOnly token cookie and the CSRF token
    (a readable cookie) that state-changing requests echo."""

    token: str
    csrf: str


def page_login(url: str, name: str, password: str) -> Login:
    """Sign in through the server's own POST /api/login, as the login screen does."""
    request = urllib.request.Request(
        url + "api/login", data=json.dumps({"name": name, "password": password}).encode(),
        headers={"Content-Type": "application/json", "Origin": url.rstrip("/")})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
        cookies = SimpleCookie()
        for header in response.headers.get_all("Set-Cookie") or []:
            cookies.load(header)
    return Login(cookies["edgekb_token"].value, body["csrf"])


async def sign_in(browser: Browser, url: str, login: Login) -> None:
    """Put a login's cookies in the browser (set through DevTools; test_web_page.py's
    test_login_screen_signs_in_and_out goes through the login screen itself). A cookie is not
    bound to a port: it holds for the server and a proxy in front of it alike."""
    await browser.send("Network.setCookie", name="edgekb_token", value=login.token, url=url,
                       httpOnly=True, sameSite="Strict")
    await browser.send("Network.setCookie", name="edgekb_csrf", value=login.csrf, url=url,
                       sameSite="Strict")


async def open_page(browser: Browser, url: str, login: Login | None = None,
                    timeout: float = 30) -> None:
    """Open the page (signed in with ``login`` when given) and wait for its connection."""
    if login is not None:
        await sign_in(browser, url, login)
    await browser.navigate(url)
    await connected(browser, timeout)


async def connected(browser: Browser, timeout: float = 30) -> None:
    # "?.": while the page loads itself again (a cut load) the element is briefly not there.
    await browser.wait_for("document.querySelector('[data-testid=conn]')?.dataset.state === 'up'",
                           timeout=timeout)


async def ask(browser: Browser, question: str) -> None:
    await browser.type_into(QUESTION, question)
    await browser.click(ASK)


async def cards(browser: Browser) -> list[dict[str, Any]]:
    return await browser.evaluate(CARDS)


async def card_when(browser: Browser, index: int, stages: tuple[str, ...], timeout: float = 180,
                    count: int | None = None) -> dict[str, Any]:
    """Card ``index`` (page order; -1 the newest) once its stage is one of ``stages`` (and,
    with ``count``, once there are that many cards)."""
    check = (f"(() => {{ const all = {CARDS}; const c = all.at({index}); "
             f"return c && {json.dumps(list(stages))}.includes(c.stage)"
             f"{f' && all.length === {count}' if count is not None else ''} ? c : null; }})()")
    try:
        return await browser.wait_for(check, timeout)
    except BrowserError:
        raise AssertionError(f"after {timeout} s, card {index} not in {stages}: "
                             f"{await cards(browser)}") from None


async def watch_answers(browser: Browser) -> None:
    """Record, per card, every distinct answer text seen (window.seenAnswers[id]) and the answer
    text at the moment its first source appeared (window.atFirstSource[id])."""
    await browser.evaluate("""(() => {
      window.seenAnswers = {}; window.atFirstSource = {};
      const look = () => {
        for (const c of document.querySelectorAll('#cards > .card')) {
          const id = c.dataset.id, text = c.querySelector('[data-testid=answer]').textContent;
          const seen = window.seenAnswers[id] = window.seenAnswers[id] || [];
          if (seen[seen.length - 1] !== text) seen.push(text);
          if (!(id in window.atFirstSource) && c.querySelector('[data-testid=sources] > li'))
            window.atFirstSource[id] = text;
        }
      };
      new MutationObserver(look).observe(document.getElementById('cards'),
        {childList: true, subtree: true, characterData: true});
      look();
    })()""")


async def screenshot(browser: Browser, name: str, width: int, height: int) -> Path:
    """A screenshot at this viewport size, kept under test-artifacts/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await browser.viewport(width, height, mobile=width < 600)
    path = ARTIFACTS / f"{name}-{width}.png"
    await browser.screenshot(path)
    return path


def rendered(text: str, cited: list[int]) -> str:
    """JS that renders Markdown ``text`` with the page's own renderer, citations of the numbers
    in ``cited`` as links, and returns what a user reads of it (to compare an answer on the page
    with the stored one)."""
    return (f"(() => {{ const d = document.createElement('div'); const ok = {json.dumps(cited)};"
            f" d.append(edgekb.markdown.render({json.dumps(text)}, {{cite: n => {{ "
            f"if (!ok.includes(n)) return null; const a = document.createElement('a'); "
            f"a.textContent = '[' + n + ']'; return a; }}}})); return d.textContent; }})()")
