"""The OpenAI-compatible routes in-process, driven by the official `openai` client, on the
scripted answer engine: models, chat completions (streamed and not, sources, queue position,
a client-held conversation, the no-retrieval switch), responses (stream, background, resume
with starting_after, previous_response_id, cancel) and OpenAI's error shape.

The real-model proof is in test_http_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest
from core_helpers import Core, start_core, until

SCRIPT = "Close the discharge valve."


@pytest.fixture
async def core(aiohttp_client, tmp_path: Path) -> Core:  # type: ignore[no-untyped-def]
    return await start_core(aiohttp_client, tmp_path / "data", **{
        "sessions.grace_s": 5, "storage.min_free_mb": 0, "models.llm": "gemma3-270m"})


def client_of(core: Core) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{core.client.server.port}/v1",
                              api_key=core.token, max_retries=0, timeout=10)


async def test_models_lists_the_configured_llm(core: Core) -> None:
    async with client_of(core) as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["gemma3-270m"]


async def test_a_chat_completion_answers_from_the_knowledge_base_with_sources(core: Core) -> None:
    async with client_of(core) as client:
        completion = await client.chat.completions.create(
            model="anything", messages=[{"role": "user", "content": "How do I reset it?"}])
    assert completion.choices[0].message.content == SCRIPT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gemma3-270m"
    sources = completion.model_extra["sources"]
    assert [s["n"] for s in sources] == [1] and sources[0]["doc"] == "pump-manual.md"
    assert completion.usage is not None and completion.usage.completion_tokens == 5


async def test_a_streamed_chat_completion_carries_queue_position_sources_and_text(
        aiohttp_client, tmp_path: Path) -> None:
    core = await start_core(aiohttp_client, tmp_path / "data", **{"storage.min_free_mb": 0})
    core.engine.script("first", hold_after=1)
    async with client_of(core) as client:
        first = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "first"}], stream=True)
        await until(lambda: "first" in core.engine.started)
        # A second user would wait; the same user waits too (one LLM slot): position 1.
        second = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "second"}], stream=True,
            stream_options={"include_usage": True})
        chunks = []
        async for chunk in second:
            chunks.append(chunk)
            if chunk.model_extra.get("queue", {}).get("position") == 1:
                core.engine.gate.set()
        async for _ in first:
            pass
    queue = [c.model_extra["queue"] for c in chunks if "queue" in c.model_extra]
    assert queue[0]["position"] == 1 and queue[-1]["position"] == 0
    sources = [s for c in chunks for s in c.model_extra.get("sources", [])]
    assert [s["n"] for s in sources] == [1]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


async def test_earlier_messages_are_the_conversation_and_retrieval_can_be_off(
        core: Core) -> None:
    async with client_of(core) as client:
        await client.chat.completions.create(model="m", messages=[
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "What is P-200?"},
            {"role": "assistant", "content": "A pump."},
            {"role": "user", "content": "How do I reset it?"}])
        direct = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Say hello"}],
            extra_body={"edgekb": {"retrieval": False}})
    assert core.engine.histories["How do I reset it?"] == ["What is P-200?"]
    assert core.engine.options["How do I reset it?"].retrieval is True
    assert core.engine.options["Say hello"].retrieval is False
    assert direct.model_extra["sources"] == []


async def test_errors_have_openai_shape_and_typed_sdk_exceptions(aiohttp_client,
                                                                 tmp_path: Path) -> None:
    core = await start_core(aiohttp_client, tmp_path / "data", **{
        "queue.max_waiting": 1, "queue.max_per_user": 1, "storage.min_free_mb": 0})
    core.engine.default.hold_after = 1
    async with client_of(core) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="m", messages=[
                {"role": "assistant", "content": "I speak last"}])
        assert bad.value.body == {"message": "messages: the last message must be the user's",
                                  "type": "invalid_request_error", "param": "messages",
                                  "code": "invalid_field"}
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=[{"role": "user",
                                                 "content": "q"}], extra_body={"edgekb": {"x": 1}})
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.retrieve("resp_NoSuchSession1.nope")
        assert missing.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.NotFoundError) as route:
            await client.embeddings.create(model="m", input="x")
        assert route.value.body["code"] == "not_found"
        running = asyncio.ensure_future(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "one"}]))
        await until(lambda: core.conversations.queue.waiting == 0 and core.engine.started)
        waiting = asyncio.ensure_future(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "two"}]))
        await until(lambda: core.conversations.queue.waiting == 1)
        with pytest.raises(openai.APIStatusError) as busy:
            await client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                       "content": "three"}])
        assert busy.value.status_code == 503 and busy.value.body["code"] == "busy"
        assert busy.value.body["type"] == "server_error" and busy.value.body["retry_after"] > 0
        assert busy.value.response.headers["Retry-After"]
        core.engine.gate.set()
        await asyncio.gather(running, waiting)


async def test_a_streamed_response_numbers_its_events_by_our_seq(core: Core) -> None:
    async with client_of(core) as client:
        stream = await client.responses.create(model="m", input="How do I reset it?",
                                               stream=True)
        seen = [event async for event in stream]
    assert seen[0].type == "response.created" and seen[0].sequence_number == 0
    assert seen[-1].type == "response.completed"
    numbers = [e.sequence_number for e in seen]
    assert numbers == sorted(numbers)
    text = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    assert text == SCRIPT == seen[-1].response.output_text
    notes = [e.annotation for e in seen if e.type == "response.output_text.annotation.added"]
    assert notes[0].type == "file_citation" and notes[0].filename == "pump-manual.md"
    assert notes[0].model_extra["where"] == "Troubleshooting"  # our source, whole
    # Each of our events ends with one Responses event numbered by its seq.
    session, request_id = seen[-1].response.id.removeprefix("resp_").split(".")
    log = [json.loads(f) for f in core.conversations.live[(session, request_id)].frames]
    completing = {}
    for event in seen[1:]:
        completing[event.sequence_number] = event.type
    assert sorted(completing) == [f["seq"] for f in log]


async def test_a_background_response_cut_resumes_with_starting_after(core: Core) -> None:
    core.engine.default.pieces = [f"w{i} " for i in range(40)]
    core.engine.default.hold_after = 20
    async with client_of(core) as client:
        created = await client.responses.create(model="m", input="long", background=True)
        assert created.status in ("queued", "in_progress") and created.background is True
        stream = await client.responses.retrieve(created.id, stream=True)
        first = []
        async for event in stream:
            first.append(event)
            if event.type == "response.output_text.delta" and len(first) > 12:
                break
        await stream.close()  # the cut: the background answer goes on, nobody follows
        await asyncio.sleep(0.2)
        core.engine.gate.set()
        last = first[-1].sequence_number
        rest = [e async for e in await client.responses.retrieve(
            created.id, stream=True, starting_after=last)]
        uncut = [e async for e in await client.responses.retrieve(created.id, stream=True)]
        final = await client.responses.retrieve(created.id)
        # The SDK's own accumulating helper, resumed where the cut was.
        async with client.responses.stream(response_id=created.id, starting_after=last) as s:
            helper = await s.get_final_response()
    assert all(e.sequence_number > last for e in rest)
    dump = [e.model_dump() for e in first + rest]
    assert dump == [e.model_dump() for e in uncut], "the resumed stream is not the uncut one"
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == "".join(f"w{i} " for i in range(40)) == final.output_text
    assert final.status == "completed" and helper.output_text == final.output_text


async def test_a_background_response_outlives_the_grace_time(aiohttp_client,
                                                             tmp_path: Path) -> None:
    core = await start_core(aiohttp_client, tmp_path / "data", **{
        "sessions.grace_s": 0.2, "storage.min_free_mb": 0})
    core.engine.default.hold_after = 1
    async with client_of(core) as client:
        created = await client.responses.create(model="m", input="held", background=True)
        await asyncio.sleep(0.6)  # nobody follows, three grace times pass
        core.engine.gate.set()
        await until(lambda: all(r.complete for r in core.conversations.live.values()))
        final = await client.responses.retrieve(created.id)
    assert final.status == "completed" and final.output_text == SCRIPT


async def test_previous_response_id_continues_the_session_and_cancel_stops(core: Core) -> None:
    async with client_of(core) as client:
        first = await client.responses.create(model="m", input="What is P-200?")
        assert first.status == "completed" and first.output_text == SCRIPT
        core.engine.script("held", hold_after=1)
        second = await client.responses.create(model="m", input="held", background=True,
                                               previous_response_id=first.id)
        await until(lambda: "held" in core.engine.started)
        await client.responses.cancel(second.id)
        await until(lambda: all(r.complete for r in core.conversations.live.values()))
        final = await client.responses.retrieve(second.id)
    assert core.engine.histories["held"] == ["What is P-200?"]
    assert first.id.split(".")[0] == second.id.split(".")[0], "not the same session"
    assert final.status == "cancelled" and final.output_text == "Close"
