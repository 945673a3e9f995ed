"""The LLM step on another server, through its OpenAI-compatible streaming API.

For users who outgrow one small box: llama.cpp's server, vLLM or Ollama do the generation, and
edgekb keeps retrieval, sessions and the protocol. The events are the same as the local engine's
(there is no prompt-reading progress to report: the remote server reads the prompt itself).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .errors import EdgekbError
from .llm import Finished, GenerationRequest, LlmEvent, Piece, StopScanner

# No local tokenizer for a remote model: count conservatively (English runs ~4 chars a token).
CHARS_PER_TOKEN = 3


class RemoteLlmError(EdgekbError):
    code = "llm_unavailable"


class RemoteLlm:
    def __init__(self, endpoint: str, model: str, *, n_ctx: int, prompt_format: str,
                 seed: int, timeout_s: float = 600.0, flush_interval_s: float = 0.05) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.flush_interval_s = flush_interval_s
        self.model = model
        self.n_ctx = n_ctx
        self.chat = prompt_format == "chat"
        self.seed = seed
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
        self._http: aiohttp.ClientSession | None = None

    def count_tokens(self, text: str) -> int:
        return len(text) // CHARS_PER_TOKEN + 1

    def metadata(self, key: str) -> str | None:
        return None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens,
                                "temperature": request.temperature, "stream": True,
                                "seed": self.seed}
        if request.stop:
            body["stop"] = list(request.stop)[:4]  # OpenAI's API takes at most four
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            return "/chat/completions", body
        body["prompt"] = request.prompt
        return "/completions", body

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LlmEvent]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self.timeout)
        path, body = self._body(request)
        started = time.perf_counter()
        first: float | None = None
        scanner = StopScanner(request.stop)  # servers differ in how exactly they apply stops
        generated, finish, usage = 0, "length", {}
        # Coalesced as the local engine does: the first visible text at once, then what
        # arrived within each flush interval as one Piece.
        held: list[str] = []
        visible = False
        flushed_at = 0.0
        try:
            async with self._http.post(self.endpoint + path, json=body) as response:
                if response.status != 200:
                    detail = (await response.text())[:300]
                    raise RemoteLlmError(f"{self.endpoint} answered {response.status}: {detail}")
                async for choice, chunk_usage in _sse_choices(response):
                    usage = chunk_usage or usage
                    if request.cancel.is_set():
                        finish = "cancelled"
                        break
                    text = (choice.get("delta") or {}).get("content") if self.chat \
                        else choice.get("text")
                    if text:
                        first = first or time.perf_counter()
                        generated += 1
                        out, stopped = scanner.feed(text)
                        held.append(out)
                        now = time.perf_counter()
                        if not visible or now - flushed_at >= self.flush_interval_s:
                            chunk = "".join(held)
                            held.clear()
                            if chunk:
                                visible = visible or not chunk.isspace()
                                flushed_at = now
                                yield Piece(chunk)
                        if stopped:
                            finish = "stop"
                            break
                    if choice.get("finish_reason"):
                        finish = "stop" if choice["finish_reason"] == "stop" else "length"
                        held.append(scanner.flush())
                        break
        except aiohttp.ClientError as exc:
            raise RemoteLlmError(f"cannot reach the LLM server at {self.endpoint}: {exc}") from exc
        if "".join(held):
            yield Piece("".join(held))
        end = time.perf_counter()
        first = first or end
        yield Finished(finish, int(usage.get("prompt_tokens") or self.count_tokens(request.prompt)),
                       0, int(usage.get("completion_tokens") or generated),
                       (first - started) * 1000, (end - first) * 1000)


async def _sse_choices(response: aiohttp.ClientResponse
                       ) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(first choice, usage or None) of each `data:` event until [DONE]."""
    async for raw in response.content:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        choices = chunk.get("choices") or [{}]
        yield choices[0], chunk.get("usage")
