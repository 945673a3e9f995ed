"""Every object shared through the aiohttp application, as a typed key (no globals)."""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .answer import AnswerEngine
from .config import Settings
from .embed import Embedder
from .index import VectorIndex
from .llm import LlmEngine
from .store import AsyncStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", AsyncStore)
EMBEDDER = web.AppKey("embedder", Embedder)
EMBED_POOL = web.AppKey("embed_pool", ThreadPoolExecutor)
INDEX = web.AppKey("index", VectorIndex)
LLM = web.AppKey("llm", LlmEngine)
ANSWERS = web.AppKey("answers", AnswerEngine)
SOCKETS = web.AppKey("sockets", weakref.WeakSet[web.WebSocketResponse])
