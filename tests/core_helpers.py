"""The app in-process (aiohttp_client) on a scripted answer engine, and a WebSocket peer that
checks every frame the server sends against the event builders (edgekb/events.py)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from scripted import ScriptedAnswers

from edgekb import events, keys
from edgekb.app import create_app
from edgekb.config import load_settings
from edgekb.conversations import Conversations
from edgekb.protocol import PROTOCOL
from edgekb.tokens import token_authority

MAX_FRAMES = 10_000  # bound on frames any helper reads


@dataclass
class Core:
    client: TestClient
    engine: ScriptedAnswers
    app: web.Application
    data_dir: Path

    @property
    def conversations(self) -> Conversations:
        return self.app[keys.CONVERSATIONS]

    async def connect(self, session: str | None = None) -> Peer:
        ws = await self.client.ws_connect("/ws" + (f"?session={session}" if session else ""),
                                          protocols=(PROTOCOL,))
        peer = Peer(ws)
        peer.welcome = await peer.receive()
        assert peer.welcome["type"] == "welcome", peer.welcome
        return peer


@dataclass
class Peer:
    ws: aiohttp.ClientWebSocketResponse
    welcome: dict[str, Any] = field(default_factory=dict)
    aside: list[dict[str, Any]] = field(default_factory=list)

    @property
    def session(self) -> str:
        return self.welcome["session"]

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def receive(self, timeout: float = 5) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, f"connection ended: {msg}"
        assert not events.problems(msg.data), (events.problems(msg.data), msg.data)
        return json.loads(msg.data)

    async def next_of(self, request_id: str | None, timeout: float = 5) -> dict[str, Any]:
        """The next frame of a request (None: the next frame of no request)."""
        for index, frame in enumerate(self.aside):
            if frame.get("id") == request_id:
                return self.aside.pop(index)
        deadline = time.monotonic() + timeout
        for _ in range(MAX_FRAMES):
            frame = await self.receive(max(0.01, deadline - time.monotonic()))
            if frame.get("id") == request_id:
                return frame
            self.aside.append(frame)
        raise AssertionError("too many frames")

    async def until_end(self, request_id: str, timeout: float = 5) -> list[dict[str, Any]]:
        """Frames of a request up to its done or error."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        for _ in range(MAX_FRAMES):
            frame = await self.next_of(request_id, max(0.01, deadline - time.monotonic()))
            frames.append(frame)
            if frame["type"] in ("done", "error"):
                return frames
        raise AssertionError("too many frames")

    async def close(self) -> None:
        await self.ws.close()


async def start_core(aiohttp_client: Any, data_dir: Path, user: str = "test-user",
                     **overrides: Any) -> Core:
    """The app with authentication on, as shipped: the client carries a token of ``user``
    (role admin) signed with the data dir's key, as `edgekb token issue` makes one."""
    settings = load_settings(env={}, overrides={"data_dir": data_dir, **overrides})
    token, _ = token_authority(settings).issue(user, "admin", 3600)
    engine = ScriptedAnswers()
    app = create_app(settings, answers=engine)
    client = await aiohttp_client(app, headers={"Authorization": f"Bearer {token}"})
    return Core(client, engine, app, data_dir)


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "delta")


async def until(check: Any, timeout: float = 5, step: float = 0.01) -> None:
    """Wait (bounded) until check() is true."""
    for _ in range(int(timeout / step) + 1):
        if check():
            return
        await asyncio.sleep(step)
    raise AssertionError("condition not met in time")
