"""A minimal headless Chromium driven over the Chrome DevTools Protocol (aiohttp WebSocket only).

Enough for page tests: launch, navigate, evaluate JS, wait for a JS condition, click like a user,
type, screenshot, a second tab, a phone-sized viewport, files for a file input. Every wait is
bounded; close() of the first tab always kills the browser's process group.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-proxy-server", "--window-size=1000,1200", "--remote-debugging-port=0")


class BrowserError(AssertionError):
    pass


class Browser:
    def __init__(self, process: subprocess.Popen[bytes], session: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse, port: int, owner: bool = True) -> None:
        self.process, self.session, self.ws = process, session, ws
        self.port = port
        self.owner = owner  # the first tab owns the process; close() of another closes a tab
        self.ids = itertools.count(1)

    @classmethod
    async def launch(cls, profile: Path, timeout: float = 30) -> Browser:
        profile.mkdir(parents=True, exist_ok=True)
        log = (profile.parent / f"{profile.name}-chromium.log").open("wb")
        # Own process group: close() can kill the renderers and the zygote along with the browser.
        process = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}",
                                    "about:blank"], stdout=log, stderr=log, start_new_session=True)
        log.close()
        session = aiohttp.ClientSession()
        try:
            port = await _devtools_port(profile / "DevToolsActivePort", process, timeout)
            async with session.get(f"http://127.0.0.1:{port}/json/list",
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        except BaseException:
            await session.close()
            _kill(process)
            raise
        browser = cls(process, session, ws, port)
        await browser.send("Page.enable")
        return browser

    async def new_tab(self, timeout: float = 30) -> Browser:
        """Another tab of the same browser: same profile, so storage is shared, as a user's
        second tab shares it."""
        async with self.session.put(f"http://127.0.0.1:{self.port}/json/new?about:blank",
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            target = await resp.json()
        ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        tab = Browser(self.process, self.session, ws, self.port, owner=False)
        await tab.send("Page.enable")
        return tab

    async def close(self) -> None:
        if not self.owner:
            await asyncio.wait_for(self.ws.close(), 5)
            return
        try:
            await asyncio.wait_for(self.ws.close(), 5)
            await self.session.close()
        finally:
            _kill(self.process)

    async def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """One command and its reply; events in between are not needed here and are dropped."""
        cid = next(self.ids)
        await self.ws.send_json({"id": cid, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = await self.ws.receive(timeout=left)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise BrowserError(f"DevTools connection ended during {method}: {msg}")
            reply = json.loads(msg.data)
            if reply.get("id") == cid:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply["result"]
        raise BrowserError(f"{method}: no reply within {timeout} s")

    async def evaluate(self, js: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=js, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"JS failed: {result['exceptionDetails']}\n{js}")
        return result["result"].get("value")

    async def navigate(self, url: str, timeout: float = 30) -> None:
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigate {url}: {result['errorText']}")
        await self.wait_for("document.readyState === 'complete'", timeout)

    async def wait_for(self, js: str, timeout: float, interval: float = 0.1) -> Any:
        """Poll a JS expression until it is truthy; return its value (bounded in time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := await self.evaluate(js):
                return value
            await asyncio.sleep(interval)
        raise BrowserError(f"not true within {timeout} s: {js}")

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (so a disabled button stays unclicked)."""
        box = await self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: 'center', inline: 'center'}});  // as a user scrolls to it
            const r = e.getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, button="left", clickCount=1,
                            **box)

    async def type_into(self, selector: str, text: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)

    async def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        """Lay the page out as a screen of this size (a phone: mobile=True)."""
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=mobile)

    async def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in an <input type=file>, as the file picker would."""
        root = (await self.send("DOM.getDocument"))["root"]["nodeId"]
        node = (await self.send("DOM.querySelector", nodeId=root, selector=selector))["nodeId"]
        await self.send("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in paths])

    async def screenshot(self, *paths: Path) -> None:
        data = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        for path in paths:
            path.write_bytes(data)


async def _devtools_port(port_file: Path, process: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrowserError(f"chromium exited with {process.returncode}")
        lines = port_file.read_text().splitlines() if port_file.exists() else []
        if lines and lines[0].isdigit():
            return int(lines[0])
        await asyncio.sleep(0.1)
    raise BrowserError(f"chromium wrote no {port_file.name} within {timeout} s")


def _kill(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM first so the browser reaps its own helpers; then kill whatever of its group is left.
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
