"""Every object shared through the aiohttp application, as a typed key (no globals)."""

from __future__ import annotations

import weakref

from aiohttp import web

from .answer import AnswerEngine
from .config import Settings
from .embed import Embedder
from .index import Library
from .llm import LlmEngine
from .store import AsyncStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", AsyncStore)
EMBEDDER = web.AppKey("embedder", Embedder)
LIBRARY = web.AppKey("library", Library)
LLM = web.AppKey("llm", LlmEngine)
ANSWERS = web.AppKey("answers", AnswerEngine)
SOCKETS = web.AppKey("sockets", weakref.WeakSet[web.WebSocketResponse])
