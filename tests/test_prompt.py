"""Prompts fit the context window by priority, with the model's own tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekb.catalog import Catalog, default_manifest_path, fetch
from edgekb.config import GenerationSettings, ModelsSettings, Settings
from edgekb.engines import load_llm, prompt_builder
from edgekb.prompt import EXAMPLE_ANSWER
from edgekb.sessions import Turn
from edgekb.store import ChunkHit


def hit(n: int, words: int) -> ChunkHit:
    text = " ".join(f"step{n}-{i} torque the flange bolt" for i in range(words // 5))
    return ChunkHit(n, "default", f"/docs/manual-{n}.md", f"Manual {n}", "Maintenance", None, text)


def turn(n: int, words: int, doc: str = "manual-1.md") -> Turn:
    return Turn(n, f"r{n}", f"question number {n}?", " ".join(["answer"] * words),
                [{"doc": doc}], "stop", 0.0)


# The two board defaults (chat templates from the GGUF) and the base model (completion form).
@pytest.fixture(scope="module",
                params=["qwen25-coder-05b", "smollm2-135m", "gemma3-270m"])
def engine(request: pytest.FixtureRequest, models_cache: Path, tmp_path_factory):
    fetch(models_cache, Catalog.load(default_manifest_path()).get(request.param))
    settings = Settings(data_dir=tmp_path_factory.mktemp("p"),
                        models=ModelsSettings(cache_dir=str(models_cache), llm=request.param),
                        generation=GenerationSettings(max_tokens=256))
    catalog = Catalog.load(default_manifest_path())
    llm, entry = load_llm(settings, catalog)
    yield llm, prompt_builder(settings, llm, entry), entry
    llm.close()


def test_prompt_never_overflows_and_keeps_priorities(engine) -> None:
    llm, builder, entry = engine
    question = "What torque for the flange bolts on line 3?"
    hits = [hit(i, 400) for i in range(1, 9)]  # far more than the window holds
    history = [turn(i, 300) for i in range(1, 7)]
    prompt = builder.build(question, hits, history)
    tokens = llm.count_tokens(prompt.text)
    assert tokens <= llm.n_ctx - 256, tokens
    assert question in prompt.text
    assert 1 <= prompt.sources_used < len(hits)
    # Sources are kept from the best-ranked down; the rest are dropped.
    assert "step1-0" in prompt.text and "step8-0" not in prompt.text
    # Turns that fit are the newest ones.
    if prompt.turns_used:
        assert "question number 6?" in prompt.text and "question number 1?" not in prompt.text


def test_short_prompt_keeps_everything_in_order(engine) -> None:
    llm, builder, entry = engine
    prompt = builder.build("Where is the reset button?", [hit(1, 30), hit(2, 30)],
                           [turn(1, 10), turn(2, 10)])
    assert prompt.sources_used == 2 and prompt.turns_used == 2
    text = prompt.text
    # What stays between follow-ups comes first, so the KV cache can reuse it.
    assert text.index("[1] Manual 1") < text.index("[2] Manual 2") \
        < text.index("question number 1?") < text.index("question number 2?") \
        < text.index("Where is the reset button?")
    if entry.settings.get("prompt_format") == "chat":
        assert "<|im_start|>" in text and text.rstrip().endswith("assistant")
    else:
        assert text.endswith("Answer:")
    if entry.settings.get("worked_example"):  # Qwen: measured better with it, SmolLM2 worse
        # The worked example comes first: the same for every question, so always cached.
        assert text.index(EXAMPLE_ANSWER) < text.index("[1] Manual 1")
    else:
        assert EXAMPLE_ANSWER not in text


def test_turns_about_another_manual_stay_out(engine) -> None:
    llm, builder, entry = engine
    question = "Which torque applies to the flange bolts of the second pump?"
    prompt = builder.build(question, [hit(1, 30)],
                           [turn(1, 10, doc="chiller.md"), turn(2, 10)])
    assert prompt.turns_used == 1
    assert "question number 2?" in prompt.text and "question number 1?" not in prompt.text


def test_a_follow_up_with_the_same_sources_starts_as_the_prompt_before_it(engine) -> None:
    """The earlier prompt and its answer are the follow-up's first tokens (the KV cache holds
    them), and the idle pre-read head is the follow-up's prompt up to its question."""
    _, builder, _ = engine
    sources = [hit(1, 60), hit(2, 60)]
    first = builder.build("How do I torque the flange bolts?", sources)
    answer = "Torque them crosswise to 40 Nm. [1]"
    history = [Turn(1, "r1", "How do I torque the flange bolts?", answer,
                    [{"doc": "manual-1.md"}], "stop", 0.0)]
    follow = builder.build("And the second pass?", sources, history)
    assert follow.turns_used == 1
    assert follow.text.startswith(first.text)
    assert follow.text.index(answer) >= len(first.text)
    head = builder.head(history, sources)
    assert follow.text.startswith(head) and answer in head
    assert len(follow.text) - len(head) < 120  # the question and the template's end
    # Without the earlier sources the head is what every prompt starts with.
    assert first.text.startswith(builder.head(history)) and answer not in builder.head(history)
