"""Everything that needs a running server, on the demo manuals, one LLM process busy at a time.

Two servers, one after the other on the same data dir: the main one with default settings, then
one with `server.compress=true` and `generation.state_cache_mb=0` (the compressed wire bytes,
and the follow-up without prefix reuse; clients of the follow-up do not offer compression, so
only the state cache differs for them). The raw llama-cpp-python model lives in this process
and runs only while the server is idle.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
from pathlib import Path
from typing import Any

import aiohttp

from . import batching, connections, threads, wire
from .common import Sheet, bench_settings, log, median, ratio
from .llm import (
    FOLLOW_UPS,
    INTERLEAVED,
    QUESTIONS,
    BuiltPrompt,
    RawLlm,
    build_prompts,
    same_text,
    summarize_pair,
)
from .server import (
    Answer,
    Server,
    ask,
    connect,
    follow,
    ingest_demo,
    send_ask,
    start_server,
    until_idle,
)

DETERMINISTIC = ("generation.temperature=0",)
QUEUE_CLIENTS = 3
FANOUT_ROUNDS = 3
FD_MARGIN = 500  # descriptors beyond the idle connections: followers, files, libraries


async def stream_pairs(server: Server, raw: RawLlm, prompts: list[BuiltPrompt]
                       ) -> list[dict[str, Any]]:
    """Each question once through the server (new session, the server already warm from the
    follow-ups), then raw with the same prompt and the same cached prefix the server had."""
    pairs = []
    raw.warm_up(prompts[0])
    async with aiohttp.ClientSession(headers=server.headers) as http:
        for number, prompt in enumerate(prompts):
            ws, _ = await connect(http, server.ws_url)
            answer = await ask(ws, f"s{number}", prompt.question)
            await ws.close()
            await until_idle(http, server)
            done = answer.done
            run = raw.run(prompt, done["usage"].get("cached_prompt_tokens", 0))
            pair = summarize_pair(prompt, done, answer.text, run, answer.client_tokens_per_s(),
                                  answer.ttft_ms)
            pair["loadavg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine
            log(f"  {prompt.question[:40]}…: server {pair['server_client_tokens_per_s'] or 0:.1f}"
                f" tok/s, raw {pair['raw_tokens_per_s'] or 0:.1f} tok/s; TTFT server "
                f"{pair['server_ttft_ms']:.0f} ms, raw retrieval+prompt "
                f"{pair['raw_retrieval_ms'] + pair['raw_ttft_ms']:.0f} ms")
            pairs.append(pair)
    return pairs


async def follow_ups(server: Server, count: int, slots: int) -> list[Answer]:
    """The third answer of each of ``count`` three-question conversations, ``slots`` other
    sessions asking at once before each third one (so every slot holds another prompt: only
    a KV snapshot can bring the conversation's back), and a pause until the server is idle
    (users read).

    Run first on a freshly started server: the two servers then do exactly the same work up to
    each third question, so the conversations' earlier answers, and thus the third prompts, are
    the same on both (the KV cache's numerics depend on what was evaluated before).
    """
    thirds = []
    async with aiohttp.ClientSession(headers=server.headers) as http:
        for number, questions in enumerate(FOLLOW_UPS[:count]):
            ws, _ = await connect(http, server.ws_url)
            await ask(ws, f"f{number}-1", questions[0])
            await ask(ws, f"f{number}-2", questions[1])
            others = [o for o, _ in await asyncio.gather(*(connect(http, server.ws_url)
                                                           for _ in range(slots)))]
            await asyncio.gather(*(ask(o, f"f{number}-x{i}", INTERLEAVED)
                                   for i, o in enumerate(others)))
            await until_idle(http, server)  # the users read their answers
            thirds.append(await ask(ws, f"f{number}-3", questions[2]))
            for o in others:
                await o.close()
            await ws.close()
    return thirds


async def queue_waits(server: Server, rounds: int) -> tuple[list[float], list[list[int]]]:
    """Three clients ask at once; ms until each got its first `queued`, then all cancel."""
    waits: list[float] = []
    positions: list[list[int]] = []
    async with aiohttp.ClientSession(headers=server.headers) as http:
        for round_ in range(rounds):
            sockets = [ws for ws, _ in await asyncio.gather(
                *(connect(http, server.ws_url) for _ in range(QUEUE_CLIENTS)))]
            ids = [f"q{round_}-{i}" for i in range(QUEUE_CLIENTS)]
            answers = await asyncio.gather(*(send_ask(ws, rid, QUESTIONS[i % len(QUESTIONS)])
                                             for i, (ws, rid) in enumerate(zip(sockets, ids))))
            await asyncio.gather(*(follow(ws, rid, a, timeout=60, until="queued")
                                   for ws, rid, a in zip(sockets, ids, answers)))
            waits += [(a.first_queued_at - a.sent_at) * 1000 for a in answers
                      if a.first_queued_at is not None]
            positions.append([a.events[-1].get("position", -1) for a in answers])
            for ws, rid in zip(sockets, ids):
                await ws.send_str(json.dumps({"type": "cancel", "id": rid}))
            await asyncio.gather(*(follow(ws, rid, a, timeout=120)
                                   for ws, rid, a in zip(sockets, ids, answers)))
            for ws in sockets:
                await ws.close()
    return waits, positions


def record_stream(sheet: Sheet, pairs: list[dict[str, Any]]) -> None:
    n = len(pairs)
    client = [ratio(p["server_client_tokens_per_s"], p["raw_tokens_per_s"]) for p in pairs]
    worker = [ratio(p["server_worker_tokens_per_s"], p["raw_tokens_per_s"]) for p in pairs]
    same = all(p["same_prompt"] and p["same_text"] for p in pairs)
    check = "prompts and answers identical on both sides" if same else \
        "WARNING: some prompt or answer differs between server and raw (see details.stream)"
    sheet.put("stream_ratio", median([r for r in client if r is not None]) if any(client)
              else None,
              f"generation tokens/s through the whole server (WebSocket client on loopback, "
              f"temperature 0, (tokens-1)/(last delta - first delta)) / raw llama-cpp-python "
              f"generate loop on the same prompt with the same cached prefix; median of the "
              f"per-question ratios over {n} questions, server and raw alternating; {check}")
    sheet.put("stream_ratio_worker", median([r for r in worker if r is not None])
              if any(worker) else None,
              "the same with the server's own done.timings.tokens_per_s (LLM worker thread)")
    sheet.put("ttft_overhead_ms", median([p["ttft_overhead_ms"] for p in pairs]),
              f"server time to first token (client: ask sent -> first delta) minus the "
              f"server's retrieval and its LLM worker's prompt reading: what serving adds "
              f"(prompt building, tokenizing, queue, first token, hand-off, event log, "
              f"WebSocket); median over {n} questions", 1)
    reads = [p["prompt_read_ratio"] for p in pairs if p["prompt_read_ratio"] is not None]
    sheet.put("prompt_read_ratio", median(reads) if reads else None,
              f"raw llama-cpp-python time to first token / the server worker's prompt reading,"
              f" same prompt, same cached prefix (raw's includes its first token); median "
              f"over {len(reads)} questions")
    sheet.put("ttft_overhead_vs_raw_ms", median([p["ttft_overhead_vs_raw_ms"] for p in pairs]),
              f"server time to first token minus (retrieval ms as AnswerEngine reports it "
              f"in-process, median of 3, + raw llama-cpp-python time to first token of the "
              f"same prompt and cached prefix): the two prompt reads' noise (+-300 ms on "
              f"2 cores) dominates it; median over {n} questions", 1)
    sheet.put("ttft_ms", median([p["server_ttft_ms"] for p in pairs]),
              f"server time to first token, client-measured, median over {n} questions", 1)
    parts = [p for p in pairs if p["pipeline_ms"] is not None]
    if parts:
        sheet.put("ttft_pipeline_ms", median([p["pipeline_ms"] for p in parts]),
                  "inside the server: (answer start -> first visible text reaching the loop) - "
                  "retrieval - the worker's prompt reading and first token: prompt building, "
                  f"tokenizing, the hand-off; median over {len(parts)}", 1)
        sheet.put("ttft_delivery_ms", median([p["delivery_ms"] for p in parts]),
                  "client TTFT - the server's own TTFT: queue, storing the events in SQLite "
                  f"before release, WebSocket; median over {len(parts)}", 1)
    sheet.detail("stream", pairs)


def record_follow_up(sheet: Sheet, reuse: list[Answer], fresh: list[Answer]) -> None:
    def usage(a: Answer) -> dict[str, Any]:
        done = a.done
        return {"ttft_ms": round(a.ttft_ms, 1), "server_prompt_ms": done["timings"]["prompt_ms"],
                "client_tokens_per_s": a.client_tokens_per_s(),
                "worker_tokens_per_s": done["timings"].get("tokens_per_s"), **done["usage"]}

    # Only conversations whose third prompt is the same on both servers compare, and only
    # those the LLM answered (a "not covered" answer reads no prompt).
    same = [(a, b) for a, b in zip(reuse, fresh)
            if a.done["usage"]["prompt_tokens"] == b.done["usage"]["prompt_tokens"] > 0]
    sheet.put("followup_ttft_ratio", median([a.ttft_ms / b.ttft_ms for a, b in same])
              if same else None,
              f"TTFT of the 3rd question of a conversation (as many other sessions as there "
              f"are slots asked at once in between, then a pause until the server was idle) "
              f"on the default server (its KV state cache restores the session's prefix) / the "
              f"same question with the same prompt on a server with "
              f"generation.state_cache_mb=0; median over {len(same)} of {len(reuse)} "
              f"conversations (those whose third prompt came out the same on both servers)")
    sheet.detail("followup", {"reuse": [usage(a) for a in reuse],
                              "no_reuse": [usage(a) for a in fresh]})


def _median_between(values: list[float | None], around: list[float | None]) -> float | None:
    """Median over i of values[i] / the mean of around[i] and around[i + 1]; None if any
    figure is missing."""
    if None in values or None in around:
        return None
    return median([v / ((around[i] + around[i + 1]) / 2)  # type: ignore[operator]
                   for i, v in enumerate(values)])


async def many_connections(sheet: Sheet, server: Server, quick: bool, raw: RawLlm,
                           prompt: BuiltPrompt) -> None:
    # This process and the servers (which inherit it) share one open-file limit.
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit < 1000 + FD_MARGIN:
        raise RuntimeError(f"the open-file limit is {limit}: raise the hard limit (ulimit -Hn)"
                           f" to at least {1000 + FD_MARGIN}")
    five_k = not quick and limit >= 5000 + FD_MARGIN
    counts = [1000, 5000] if five_k else [1000]
    settle = 2.0 if quick else 25.0  # full: longer than heartbeat_s, so pings go both ways
    async with connections.client_session(server.headers) as http:
        pool = connections.IdlePool(http)
        log("connections: 1,000 idle connections to the server")
        per = {1000: await connections.idle_growth_kb(server.pid, server.ws_url, http, pool,
                                                      1000, settle)}
        # Each answer with followers lies between the same answer alone on the same server
        # (same idle connections) and between two raw llama-cpp-python runs of its prompt (in
        # a thread: the idle connections keep answering the server's heartbeats). Back to
        # back, raw alone decodes at 24-36 tok/s on this VM, so one pair says little: rounds.
        log(f"connections: {FANOUT_ROUNDS} rounds of the answer while 100 connections follow "
            "it, each between the answer alone and raw llama-cpp-python")
        question = prompt.question
        raw_tps = [(await asyncio.to_thread(raw.run, prompt, 0)).tokens_per_s]
        alone_tps = [(await connections.loop_lag(server, http, question, 1, 1.0)
                      )["answer"].client_tokens_per_s()]
        lags = []
        for _ in range(FANOUT_ROUNDS):
            lags.append(await connections.loop_lag(server, http, question, 100, 2.0))
            alone_tps.append((await connections.loop_lag(server, http, question, 1, 1.0)
                              )["answer"].client_tokens_per_s())
            raw_tps.append((await asyncio.to_thread(raw.run, prompt, 0)).tokens_per_s)
        if five_k:
            log("connections: 5,000 idle connections to the server")
            per[5000] = await connections.idle_growth_kb(server.pid, server.ws_url, http, pool,
                                                         5000, settle)
        closed = pool.closed_by_server
        await pool.close()
    log("connections: the same idle connections to a bare aiohttp server")
    bare = await connections.raw_baseline(counts, settle)
    held = f"held {settle:.0f} s, server heartbeat at its default"
    sheet.put("rss_per_idle_conn_kb", per[1000],
              f"server VmRSS growth / 1,000 idle WebSocket connections ({held}); 1 run", 1)
    sheet.put("rss_per_idle_conn_ratio", ratio(per[1000], bare[1000]),
              "the same / a bare aiohttp WebSocket server (heartbeat=20) holding 1,000 idle "
              "connections in the same run")
    if not quick and not five_k:
        for key in ("rss_per_idle_conn_kb_5000", "rss_per_idle_conn_ratio_5000"):
            sheet.put(key, None, f"not measured: the open-file limit is {limit}")
    if five_k:
        sheet.put("rss_per_idle_conn_kb_5000", per[5000],
                  f"server VmRSS growth per connection from 1,000 to 5,000 idle ({held}); 1 run",
                  1)
        sheet.put("rss_per_idle_conn_ratio_5000", ratio(per[5000], bare[5000]),
                  "the same / bare aiohttp from 1,000 to 5,000")
    lag = lags[0]
    sheet.put("loop_lag_p99_ms", median([each["busy_p99_ms"] for each in lags]),
              f"p99 round trip of application pings (every 20 ms, own process, own connection)"
              f" while 100 connections of one session follow one answer (1 asked, 99 resumed) "
              f"and 1,000 idle connections are held; median of {len(lags)} answers of "
              f"{lag['busy_samples']} samples or so; an upper bound of the server's loop lag", 2)
    sheet.put("loop_lag_max_ms", max(each["busy_max_ms"] for each in lags),
              "the longest of those round trips: one stall of the loop shows here, not in p99",
              2)
    sheet.put("loop_lag_idle_p99_ms", median([each["idle_p99_ms"] for each in lags]),
              f"the same with only the idle connections, before each answer "
              f"({lag['idle_samples']} samples each): the floor of the measurement", 2)
    followed = [each.pop("answer").client_tokens_per_s() for each in lags]
    sheet.put("stream_ratio_100_followers", _median_between(followed, raw_tps),
              f"tokens/s seen by the asking client while 100 follow / the mean of raw "
              f"llama-cpp-python's tokens/s on the same prompt just before and just after "
              f"(this process, the server idle with its 1,000 idle connections); median of "
              f"{len(lags)} rounds")
    sheet.put("stream_ratio_100_followers_paired", _median_between(followed, alone_tps),
              f"the same tokens/s / the mean of the same answer asked alone on the server just "
              f"before and just after (no followers, the same 1,000 idle connections and "
              f"pinger): the fan-out's own cost, without the VM's drift; median of {len(lags)}")
    busy = lag["cores_busy"]
    sheet.put("fanout_event_loop_cores", busy["server_event_loop"],
              "CPU seconds of the server's event-loop thread per wall second while 100 "
              "connections follow one answer: what the fan-out takes from decoding", 3)
    sheet.put("fanout_bench_client_cores", round(busy["bench_clients"] + busy["pinger"], 3),
              "the same for this bench's own clients (the 100 followers, the idle "
              "connections and the pinger), which share the server's cores here and would "
              "run on the technicians' devices in the field", 3)
    sheet.detail("loop_lag", {**{k: round(v, 2) if isinstance(v, float) else v
                                 for k, v in lag.items()},
                              "idle_closed_by_server": closed})
    sheet.detail("fanout_tokens_per_s", {"followed": followed, "alone": alone_tps,
                                         "raw": raw_tps})
    sheet.detail("idle_conn_kb", {"edgekb": {k: round(v, 2) for k, v in per.items()},
                                  "raw_aiohttp": {k: round(v, 2) for k, v in bare.items()}})


async def run(sheet: Sheet, work: Path, quick: bool) -> None:
    demo = work / "demo"
    log("server: ingesting the demo manuals")
    ingest_demo(demo)
    settings = bench_settings(demo)
    conversations = 1 if quick else len(FOLLOW_UPS)
    raw = RawLlm(settings)
    try:
        prompts = await build_prompts(settings, raw, QUESTIONS[: 4 if quick else 6])
        log("server: starting the main server")
        main = start_server(demo, work / "serve-main.log", *DETERMINISTIC)
        try:
            sheet.put("startup_s", main.startup_s,
                      "seconds from spawning `edgekb serve` to its ready line (models verified "
                      "and loaded, index loaded); 1 run", 2)
            sheet.put("rss_startup_mb", main.rss_ready_kb / 1024,
                      "server VmRSS when it printed the ready line; 1 run", 1)
            log("follow-up: with prefix reuse (first, on the fresh server)")
            reuse = await follow_ups(main, conversations, settings.generation.slots)
            log("stream: server and raw llama-cpp-python, question by question")
            pairs = await stream_pairs(main, raw, prompts)
            record_stream(sheet, pairs)
            log("queue: three clients ask at once")
            waits, positions = await queue_waits(main, 1 if quick else 3)
            sheet.put("queue_position_ms_max", max(waits) if waits else None,
                      f"three clients ask at once: the longest time from sending ask to its "
                      f"first queued event, over {len(waits)} asks", 1)
            sheet.detail("queue", {"waits_ms": [round(w, 1) for w in waits],
                                   "first_positions": positions})
            log("wire: one answer through a counting proxy")
            plain_run = await wire.answer_bytes(main.port, QUESTIONS[0], 0, main.headers)
            plain = wire.compare(plain_run, raw.token_pieces, raw.entry.name)
            sheet.put("wire_bytes_ratio", plain["ratio"],
                      "server->client TCP bytes of one whole answer over our WebSocket "
                      "(handshake and close included, counted by a proxy) / the same answer as "
                      "OpenAI chat.completion.chunk SSE events, one per token, with HTTP "
                      "headers and chunked framing; 1 answer")
            log("wire: the same answer over SSE and over /v1/chat/completions")
            sse_run = await wire.sse_answer_bytes(main.port, QUESTIONS[0], main.headers)
            chat_run = await wire.openai_answer_bytes(main.port, QUESTIONS[0], main.headers)
            sse = wire.compare(sse_run, raw.token_pieces, raw.entry.name)
            sheet.put("wire_bytes_ratio_sse", sse["ratio"],
                      "server->client TCP bytes of one whole answer over our SSE (POST "
                      "/api/ask: headers, the request event, id/event/data lines, chunked "
                      "framing) / the OpenAI SSE baseline of the same answer; 1 answer"
                      + ("" if same_text(sse_run.text, plain_run.text) else
                         "; WARNING: the answer differs from the WebSocket one"))
            sheet.detail("wire_sse", {"sse": sse, "chat_completions_bytes": chat_run.bytes,
                                      "chat_completions_ratio": ratio(chat_run.bytes,
                                                                      sse["sse_bytes"]),
                                      "same_text": same_text(chat_run.text, sse_run.text)})
            sheet.put("rss_peak_answer_mb", main.hwm_kb() / 1024,
                      "server VmHWM after the answers of the stream, follow-up, queue and wire "
                      "benchmarks (before the connection benchmarks)", 1)
            await many_connections(sheet, main, quick, raw, prompts[0])
            await batching.run(sheet, main, settings, prompts)
        finally:
            main.stop()
        log("server: starting a server with compression on and no KV state cache")
        alt = start_server(demo, work / "serve-alt.log", *DETERMINISTIC,
                           "server.compress=true", "generation.state_cache_mb=0")
        try:
            log("follow-up: without prefix reuse (first, on the fresh server)")
            fresh = await follow_ups(alt, conversations, settings.generation.slots)
            record_follow_up(sheet, reuse, fresh)
            log("wire: one answer with permessage-deflate")
            deflated = await wire.answer_bytes(alt.port, QUESTIONS[0], 15, alt.headers)
        finally:
            alt.stop()
        compressed = wire.compare(deflated, raw.token_pieces, raw.entry.name)
        sheet.put("wire_bytes_ratio_compressed", ratio(compressed["ws_bytes"],
                                                       plain["sse_bytes"]),
                  "the same with server.compress=true and a client offering permessage-deflate"
                  " (aiohttp compress=15) / the uncompressed SSE baseline; 1 answer"
                  + ("" if same_text(deflated.text, plain_run.text) else
                     "; WARNING: the answer differs from the uncompressed one"))
        sheet.detail("wire", {"plain": plain, "compressed": compressed})
    finally:
        raw.close()
    await threads.run(sheet, demo, work, settings, prompts[0], DETERMINISTIC)
