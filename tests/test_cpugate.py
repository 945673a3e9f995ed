"""Decode steps and embedding runs take turns on the cores, in arrival order (threads, no model).

Waits are bounded; a "did not start" check waits a short while for something that, with a
broken gate, would happen at once."""

from __future__ import annotations

import threading
import time

from edgekb.cpugate import CpuGate

SOON = 5.0      # something that must happen does so well within this
NOT_YET = 0.2   # something that must not happen would have happened within this


def hold(gate_turn, entered: threading.Event, release: threading.Event) -> threading.Thread:
    def body() -> None:
        with gate_turn():
            entered.set()
            assert release.wait(SOON)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_an_embedding_waits_for_the_step_in_progress_and_the_next_step_waits_for_it() -> None:
    gate = CpuGate()
    step1, end_step1 = threading.Event(), threading.Event()
    first = hold(gate.decode_step, step1, end_step1)
    assert step1.wait(SOON)
    embed, end_embed = threading.Event(), threading.Event()
    embedding = hold(gate.embedding, embed, end_embed)
    assert not embed.wait(NOT_YET)            # the step in progress finishes first
    step2, end_step2 = threading.Event(), threading.Event()
    end_step1.set()
    first.join(SOON)
    assert embed.wait(SOON)
    second = hold(gate.decode_step, step2, end_step2)
    assert not step2.wait(NOT_YET)            # the next step waits for the embedding
    end_embed.set()
    embedding.join(SOON)
    assert step2.wait(SOON)
    end_step2.set()
    second.join(SOON)


def test_embeddings_that_arrive_together_run_together() -> None:
    gate = CpuGate()
    a, b, release = threading.Event(), threading.Event(), threading.Event()
    threads = [hold(gate.embedding, a, release), hold(gate.embedding, b, release)]
    assert a.wait(SOON) and b.wait(SOON)      # both inside at once
    release.set()
    for thread in threads:
        thread.join(SOON)


def test_a_decoder_that_never_pauses_still_lets_embeddings_in() -> None:
    """Back-to-back decode steps (as while answers stream) and an ingest's back-to-back
    embedding runs: both make progress, turn by turn."""
    gate = CpuGate()
    stop = threading.Event()
    steps = 0

    def work() -> None:
        time.sleep(0.001)  # a real run leaves the GIL to the other thread, as this does

    def decoder() -> None:
        nonlocal steps
        while not stop.is_set():
            with gate.decode_step():
                steps += 1
                work()

    thread = threading.Thread(target=decoder, daemon=True)
    thread.start()
    for _ in range(50):
        with gate.embedding():
            work()
    before = steps
    for _ in range(50):
        with gate.embedding():
            work()
    stop.set()
    thread.join(SOON)
    # Turn by turn: about one step per embedding run, never a stretch of runs without steps.
    assert steps - before >= 25
