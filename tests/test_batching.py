"""Continuous batching in the local LLM engine, with the real models (no server):
answers decoded together are the same as alone, cancel stops only its own answer, a late
joiner gets its whole answer, and prefix reuse (live or from a snapshot) never changes one."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from edgekb.catalog import Catalog, default_manifest_path, fetch
from edgekb.config import GenerationSettings, ModelsSettings, Settings
from edgekb.engines import load_llm, prompt_builder
from edgekb.llm import Finished, GenerationRequest, LlmEngine, Piece, Reading
from edgekb.prompt import PromptBuilder
from edgekb.sessions import Turn
from edgekb.store import ChunkHit

DEMO = Path(__file__).resolve().parent.parent / "edgekb" / "demo"
QUESTIONS = (
    ("pump-manual.md", "How do I reset the pump after an overpressure trip?"),
    ("compressor-troubleshooting.md", "The compressor shuts down on high discharge "
                                      "temperature, what should I check?"),
    ("lockout-tagout.md", "Can a supervisor remove a lock if the owner went home?"),
    ("conveyor-maintenance.txt", "How much sag should the conveyor return belt have?"),
)
MAX_TOKENS = 48
SLOTS = 4


def load_engine(name: str, models_cache: Path, data_dir: Path
                ) -> tuple[LlmEngine, PromptBuilder]:
    """A new engine of that model: every slot empty, as after a start."""
    fetch(models_cache, Catalog.load(default_manifest_path()).get(name))
    settings = Settings(data_dir=data_dir,
                        models=ModelsSettings(cache_dir=str(models_cache), llm=name),
                        generation=GenerationSettings(max_tokens=MAX_TOKENS, slots=SLOTS))
    llm, entry = load_llm(settings, Catalog.load(default_manifest_path()))
    assert isinstance(llm, LlmEngine)
    return llm, prompt_builder(settings, llm, entry)


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def engine(request: pytest.FixtureRequest, models_cache: Path, tmp_path_factory
           ) -> tuple[LlmEngine, PromptBuilder]:
    llm, builder = load_engine(request.param, models_cache, tmp_path_factory.mktemp("b"))
    yield llm, builder
    llm.close()


def hit_of(number: int) -> ChunkHit:
    doc = QUESTIONS[number][0]
    return ChunkHit(number, "default", f"/demo/{doc}", doc, "", None,
                    (DEMO / doc).read_text()[:1500])


def prompt_of(builder: PromptBuilder, number: int, history: tuple[Turn, ...] = ()) -> str:
    return builder.build(QUESTIONS[number][1], [hit_of(number)], history).text


def request(builder: PromptBuilder, number: int, **changes) -> GenerationRequest:
    base = GenerationRequest(prompt_of(builder, number), MAX_TOKENS, 0.0, builder.stop,
                             threading.Event())
    return replace(base, **changes)


async def run(llm: LlmEngine, req: GenerationRequest, pieces: list[str] | None = None
              ) -> tuple[str, Finished]:
    text = []
    async for event in llm.stream(req):
        if isinstance(event, Piece):
            text.append(event.text)
            if pieces is not None:
                pieces.append(event.text)
        elif isinstance(event, Finished):
            return "".join(text), event
    raise AssertionError("no Finished event")


async def alone(llm: LlmEngine, builder: PromptBuilder) -> list[str]:
    return [(await run(llm, request(builder, n)))[0] for n in range(len(QUESTIONS))]


async def test_batched_greedy_answers_are_the_same_as_alone(engine) -> None:
    llm, builder = engine
    solo = await alone(llm, builder)
    together = await asyncio.gather(*(run(llm, request(builder, n))
                                      for n in range(len(QUESTIONS))))
    assert [text for text, _ in together] == solo
    assert all(text.strip() for text in solo)
    assert all(done.completion_tokens > 0 for _, done in together)


async def test_cancel_of_one_batched_answer_stops_only_that_one(engine) -> None:
    llm, builder = engine
    solo = await alone(llm, builder)
    victim = request(builder, 1, max_tokens=MAX_TOKENS)
    seen: list[str] = []

    async def cancel_after_first_piece() -> tuple[str, Finished]:
        text = []
        async for event in llm.stream(victim):
            if isinstance(event, Piece):
                text.append(event.text)
                if not victim.cancel.is_set():
                    seen.append(event.text)
                    victim.cancel.set()
            elif isinstance(event, Finished):
                return "".join(text), event
        raise AssertionError("no Finished event")

    others = [run(llm, request(builder, n)) for n in (0, 2, 3)]
    (cut_text, cut), *rest = await asyncio.gather(cancel_after_first_piece(), *others)
    assert cut.finish == "cancelled"
    # Pieces come coalesced: what the first one held, plus at most the token being decoded.
    first_tokens = llm.count_tokens(seen[0])
    assert cut.completion_tokens <= first_tokens + 1
    assert solo[1].startswith(cut_text)
    assert [text for text, _ in rest] == [solo[0], solo[2], solo[3]]


async def test_a_request_that_joins_mid_batch_gets_its_whole_answer(engine) -> None:
    llm, builder = engine
    solo = await alone(llm, builder)
    started = asyncio.Event()
    first_pieces: list[str] = []

    async def early() -> tuple[str, Finished]:
        text = []
        async for event in llm.stream(request(builder, 0)):
            if isinstance(event, Piece):
                text.append(event.text)
                first_pieces.append(event.text)
                if len(first_pieces) >= 2:
                    started.set()
            elif isinstance(event, Finished):
                started.set()
                return "".join(text), event
        raise AssertionError("no Finished event")

    async def late(number: int) -> tuple[str, Finished]:
        await started.wait()
        return await run(llm, request(builder, number))

    results = await asyncio.gather(early(), late(2), late(3))
    assert [text for text, _ in results] == [solo[0], solo[2], solo[3]]
    # The joiners read their prompts while the first answer was still being written.
    assert results[0][1].completion_tokens > 0


async def test_reused_prefixes_never_change_a_greedy_answer(engine) -> None:
    """The same prompt, read fresh and after a prompt sharing its head (live KV reuse), and
    after an idle pre-read of its head (a snapshot): the same answer every time."""
    llm, builder = engine
    # The earlier turn cites the target's manual, so the prompt keeps it (prompt.on_topic).
    history = (Turn(1, "r1", QUESTIONS[0][1], "Close the discharge valve, wait for the "
                    "pressure to fall, then press RESET. [1]", [{"doc": QUESTIONS[2][0]}],
                    "stop", 0.0),)
    target = replace(request(builder, 2), prompt=prompt_of(builder, 2, history),
                     cache_key="session-a")
    fresh_text, fresh = await run(llm, replace(target, cancel=threading.Event(),
                                               cache_key=None))
    # Fill every slot with other prompts so nothing of the target's stays resident.
    await asyncio.gather(*(run(llm, request(builder, n)) for n in range(len(QUESTIONS))))
    # The head of a follow-up that kept its source: everything up to the question.
    head = builder.head(history, [hit_of(2)])
    read = await llm.prefill(head, "session-a", threading.Event())
    assert read > 0
    reused_text, reused = await run(llm, replace(target, cancel=threading.Event()))
    assert reused.cached_tokens >= llm.count_tokens(head) - 2 * 32  # all but the partial blocks
    assert fresh.cached_tokens < reused.cached_tokens
    assert reused_text == fresh_text
    # Once more right away: the prompt's own KV is still resident in its slot.
    again_text, again = await run(llm, replace(target, cancel=threading.Event()))
    assert again.cached_tokens >= reused.cached_tokens and again_text == fresh_text


async def test_reading_progress_then_pieces_then_one_finished(engine) -> None:
    llm, builder = engine
    events = [e async for e in llm.stream(request(builder, 3))]
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "Reading" and kinds[-1] == "Finished" and "Piece" in kinds
    assert kinds.count("Finished") == 1
    assert kinds.index("Piece") > max(i for i, k in enumerate(kinds) if k == "Reading")
    readings = [e for e in events if isinstance(e, Reading)]
    assert [r.done for r in readings] == sorted(r.done for r in readings)


async def test_a_warm_start_gives_every_slot_the_shared_head(models_cache: Path,
                                                             tmp_path: Path) -> None:
    """After a start the head every prompt shares is read once into every slot: four
    questions asked at once each skip it, and their greedy answers stay those of a cold start."""
    cold_llm, builder = load_engine("smollm2-135m", models_cache, tmp_path / "cold")
    try:
        cold = await asyncio.gather(*(run(cold_llm, request(builder, n))
                                      for n in range(SLOTS)))
    finally:
        cold_llm.close()
    warm_llm, builder = load_engine("smollm2-135m", models_cache, tmp_path / "warm")
    try:
        head = builder.head([])
        read = await warm_llm.warm(head, threading.Event())
        head_tokens = warm_llm.count_tokens(head)
        warm = await asyncio.gather(*(run(warm_llm, request(builder, n))
                                      for n in range(SLOTS)))
    finally:
        warm_llm.close()
    assert read >= head_tokens - 1
    assert [f.cached_tokens for _, f in cold] == [0] * SLOTS
    # All of the head but its partial last block (16 tokens), in every slot.
    assert all(f.cached_tokens >= read - 16 for _, f in warm), [f.cached_tokens for _, f in warm]
    assert [text for text, _ in warm] == [text for text, _ in cold]


async def test_a_question_is_read_before_idle_pre_reading(models_cache: Path,
                                                          tmp_path: Path) -> None:
    """A long pre-read already under way does not hold up a question: its prompt is read
    first and its answer starts while the pre-read goes on between decode steps."""
    llm, builder = load_engine("smollm2-135m", models_cache, tmp_path / "d")
    loop = asyncio.get_running_loop()
    try:
        long_head = builder.head([], [hit_of(n) for n in range(len(QUESTIONS))])

        async def pre_read() -> float:
            assert await llm.prefill(long_head, "session-p", threading.Event()) > 0
            return loop.time()

        reading = asyncio.create_task(pre_read())
        for _ in range(200):  # bounded: 10 s until the worker has admitted the pre-read
            if any(slot.job is not None for slot in llm.decoder.slots):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the pre-read never started")
        first_piece_at = None
        async for event in llm.stream(request(builder, 3)):
            if isinstance(event, Piece) and first_piece_at is None:
                first_piece_at = loop.time()
        pre_read_done_at = await reading
    finally:
        llm.close()
    assert first_piece_at is not None
    assert first_piece_at < pre_read_done_at
