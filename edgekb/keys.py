"""Every object shared through the aiohttp application, as a typed key (no globals)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .answer import Answers
from .config import Settings
from .conversations import Conversations
from .embed import Embedder
from .index import Library
from .ingest_service import IngestService
from .llm import LlmEngine
from .llm_remote import RemoteLlm
from .metrics import Metrics
from .store import AsyncStore

if TYPE_CHECKING:
    from .sse import EventStream
    from .ws import Connection

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", AsyncStore)
EMBEDDER = web.AppKey("embedder", Embedder)
LIBRARY = web.AppKey("library", Library)
INGEST = web.AppKey("ingest", IngestService)
LLM = web.AppKey("llm", LlmEngine | RemoteLlm)
ANSWERS = web.AppKey("answers", Answers)
CONVERSATIONS = web.AppKey("conversations", Conversations)
CONNECTIONS = web.AppKey("connections", set["Connection"])
METRICS = web.AppKey("metrics", Metrics)
STREAMS = web.AppKey("streams", set["EventStream"])  # open HTTP event streams (SSE, OpenAI)
