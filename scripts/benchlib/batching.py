"""Several technicians at once: continuous batching through the server, against one at a time.

Each question gets its own session and connection. Solo: the questions one after another,
each alone on the server. Together: 2 (then 4) sent at once. The throughput figure is answers'
tokens per second of wall time (ask sent -> last done, retrieval and prompt reading included),
together / one after another, on the same questions. A joiner: 3 questions decode, then a 4th
is asked; its time to first token against its own alone. Greedy answers must be byte-identical
batched and alone (the engine's rule, README "Reproducible answers").

The raw library cannot batch through its Python API, so its figure here is llama.cpp's own C
API doing what batching can do at best: the same prompts read one by one, then every sequence
decoded in one llama_decode per step (all rows fused, which is faster than edgekb's three rows
per call but not reproducible), against the same loop with one sequence.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp
import llama_cpp
import numpy as np

from edgekb.catalog import verify
from edgekb.config import Settings
from edgekb.engines import open_catalog

from .common import Sheet, log, median, ratio
from .llm import QUESTIONS, BuiltPrompt
from .server import Answer, Server, connect, follow, send_ask, until_idle

JOINER_AFTER = 3


async def _ask_alone(http: aiohttp.ClientSession, server: Server, tag: str,
                     question: str) -> Answer:
    ws, _ = await connect(http, server.ws_url)
    try:
        answer = await send_ask(ws, tag, question)
        return await follow(ws, tag, answer)
    finally:
        await ws.close()
        await until_idle(http, server)


async def _ask_together(http: aiohttp.ClientSession, server: Server, tag: str,
                        questions: list[str], hold_last: bool = False) -> list[Answer]:
    """All questions at once; with ``hold_last`` the last one is asked only once the others
    are all writing (each has sent its first delta)."""
    sockets = [ws for ws, _ in await asyncio.gather(*(connect(http, server.ws_url)
                                                      for _ in questions))]
    try:
        first = questions[:-1] if hold_last else questions
        answers = await asyncio.gather(*(send_ask(ws, f"{tag}{i}", q)
                                         for i, (ws, q) in enumerate(zip(sockets, first))))
        runs = [asyncio.create_task(follow(ws, f"{tag}{i}", a))
                for i, (ws, a) in enumerate(zip(sockets, answers))]
        if hold_last:
            for _ in range(6000):  # bounded: 10 minutes
                if all(a.first_delta_at is not None or a.done_at is not None for a in answers):
                    break
                await asyncio.sleep(0.1)
            last = len(questions) - 1
            joiner = await send_ask(sockets[last], f"{tag}{last}", questions[last])
            answers.append(joiner)
            runs.append(asyncio.create_task(follow(sockets[last], f"{tag}{last}", joiner)))
        await asyncio.gather(*runs)
        return answers
    finally:
        for ws in sockets:
            await ws.close()
        await until_idle(http, server)


def _tokens(answers: list[Answer]) -> int:
    return sum(a.done["usage"].get("completion_tokens", 0) for a in answers)


def _wall_s(answers: list[Answer]) -> float:
    return max(a.done_at for a in answers) - min(a.sent_at for a in answers)  # type: ignore[type-var]


async def run(sheet: Sheet, server: Server, settings: Settings,
              prompts: list[BuiltPrompt]) -> None:
    questions = list(QUESTIONS[:4])
    slots = settings.generation.slots
    async with aiohttp.ClientSession(headers=server.headers) as http:
        # Every phase must find the same in the slots: once asked, each question's prompt stays
        # in a slot of its own (4 questions, 4 slots), so no phase reads a prompt the others
        # had read for it (until 2026-12-04 the solo phase read them, the others reused them).
        log("batching: each question once, unmeasured, so every phase finds its prompt cached")
        for i, q in enumerate(questions):
            await _ask_alone(http, server, f"b0-{i}", q)
        log("batching: four questions one after another")
        solo = [await _ask_alone(http, server, f"b1-{i}", q) for i, q in enumerate(questions)]
        log("batching: two at once, then four at once")
        two = await _ask_together(http, server, "b2-", questions[:2])
        four = await _ask_together(http, server, "b4-", questions)
        log("batching: a question asked while three others are being written")
        joined = await _ask_together(http, server, "bj-", questions, hold_last=True)

    def throughput_ratio(together: list[Answer]) -> float | None:
        alone = solo[: len(together)]
        return ratio(_tokens(together) / _wall_s(together),
                     _tokens(alone) / sum(a.done_at - a.sent_at for a in alone))  # type: ignore[operator]

    note = (f"answer tokens per second of wall time (ask sent -> last done, retrieval and "
            f"the unread end of each prompt included) with {{n}} questions sent at once "
            f"(separate sessions) / the same questions asked one after another, each finding "
            f"its prompt in a slot in both (asked once before); generation.slots={slots}; 1 run")
    sheet.put("batch_throughput_ratio_2", throughput_ratio(two), note.format(n=2))
    sheet.put("batch_throughput_ratio_4", throughput_ratio(four), note.format(n=4))
    walls = [a.done_at - a.sent_at for a in solo]  # type: ignore[operator]
    sheet.put("batch_throughput_ceiling_4", ratio(sum(walls), max(walls)),
              "the most batch_throughput_ratio_4 can be on these questions: the 4 together "
              "take at least as long as the longest answer alone (sum of the solo times / the "
              "longest)")
    per_stream = [ratio(b.client_tokens_per_s(), a.client_tokens_per_s())
                  for a, b in zip(solo, four)]
    per_stream = [r for r in per_stream if r is not None]
    sheet.put("batch_stream_ratio_4_min", min(per_stream) if per_stream else None,
              "with 4 questions at once: the slowest stream's tokens/s (client, first to last "
              "delta) / the same question's tokens/s alone")
    sheet.put("batch_stream_ratio_4_median", median(per_stream) if per_stream else None,
              "the same, median of the 4 streams")
    joiner, alone = joined[-1], solo[JOINER_AFTER]
    sheet.put("ttft_while_3_decode_ms", joiner.ttft_ms,
              f"time to first token of a question asked while 3 others are being written "
              f"(each had sent its first delta); slots={slots}; 1 run", 1)
    sheet.put("ttft_while_3_decode_ratio", ratio(joiner.ttft_ms, alone.ttft_ms),
              "that time to first token / the same question's alone")
    texts = {"two": [a.text for a in two], "four": [a.text for a in four],
             "joined": [a.text for a in joined]}
    alone_texts = [a.text for a in solo]
    identical = sum(t == alone_texts[i] for runs in texts.values() for i, t in enumerate(runs))
    compared = sum(len(runs) for runs in texts.values())
    sheet.put("batch_identical_answers", identical / compared,
              f"share of greedy answers written together (2, 4, 3+1 at once: {compared} answers)"
              f" that are byte-identical to the same question's answer alone; aim 1.0")
    sheet.detail("batching", {
        "slots": slots,
        "solo": [_summary(a) for a in solo], "two": [_summary(a) for a in two],
        "four": [_summary(a) for a in four], "joined": [_summary(a) for a in joined],
        "different": [(name, i) for name, runs in texts.items() for i, t in enumerate(runs)
                      if t != alone_texts[i]],
    })
    log("batching: the raw library, one sequence and four fused")
    raw = raw_batched_decode(settings, prompts[: len(questions)])
    sheet.put("raw_batch_decode_ratio_4", raw["ratio"],
              "llama.cpp C API alone: decode tokens/s of the same 4 prompts decoded together "
              "(one llama_decode per step with all rows; the most the library gives, without "
              "edgekb's reproducibility rule) / one sequence at a time; greedy, "
              f"{raw['steps']} steps; the ceiling for batch_throughput_ratio_4's decode part")
    sheet.detail("raw_batched_decode", raw)


def _summary(answer: Answer) -> dict[str, Any]:
    done = answer.done
    return {"ttft_ms": round(answer.ttft_ms, 1) if answer.first_delta_at else None,
            "client_tokens_per_s": answer.client_tokens_per_s(),
            "wall_s": round(answer.done_at - answer.sent_at, 2),  # type: ignore[operator]
            "completion_tokens": done["usage"].get("completion_tokens"),
            "cached_prompt_tokens": done["usage"].get("cached_prompt_tokens"),
            "server_ttft_ms": done["timings"].get("ttft_ms"),
            "worker_tokens_per_s": done["timings"].get("tokens_per_s")}


def raw_batched_decode(settings: Settings, prompts: list[BuiltPrompt],
                       steps: int = 48) -> dict[str, Any]:
    """Decode tokens/s of a plain C-API loop: one sequence, then all of them fused per step."""
    entry = open_catalog(settings).get(settings.models.llm, kind="llm")
    path = verify(settings.models_cache, entry)["model"]
    n_ctx = int(entry.settings.get("n_ctx", 2048))
    n = len(prompts)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(),
                                                 llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx * n, n, False
    params.n_batch = params.n_ubatch = settings.generation.n_batch
    params.n_threads = params.n_threads_batch = settings.generation.threads or os.cpu_count() or 1
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    try:
        def decode(rows: list[tuple[int, int, int, bool]]) -> None:
            for i, (token, pos, seq, logits) in enumerate(rows):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, logits
            batch.n_tokens = len(rows)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        def argmax(row: int) -> int:
            logits = llama_cpp.llama_get_logits_ith(ctx, row)
            return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

        def read(seq: int) -> int:
            tokens = prompts[seq].tokens
            for start in range(0, len(tokens), params.n_batch):
                part = tokens[start : start + params.n_batch]
                decode([(t, start + j, seq, start + j == len(tokens) - 1)
                        for j, t in enumerate(part)])
            return argmax((len(tokens) - 1) % params.n_batch)  # its row in the last call

        def decode_rate(seqs: list[int]) -> float:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), -1, -1, -1)
            nxt = {s: read(s) for s in seqs}
            pos = {s: len(prompts[s].tokens) for s in seqs}
            started = time.perf_counter()
            for _ in range(steps):
                decode([(nxt[s], pos[s], s, True) for s in seqs])
                for row, s in enumerate(seqs):
                    nxt[s], pos[s] = argmax(row), pos[s] + 1
            return steps * len(seqs) / (time.perf_counter() - started)

        one = median([decode_rate([s]) for s in range(n)])
        together = decode_rate(list(range(n)))
        return {"one_tokens_per_s": round(one, 1), "fused_tokens_per_s": round(together, 1),
                "ratio": together / one, "steps": steps, "sequences": n}
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)

