"""Retrieval quality from edgekb.evaluation: hit@3 of hybrid, vector and keyword search.

Imported lazily: when the evaluation module or its data set is missing or fails, the figures
stay null with a note saying why, and the other benchmarks still run.
"""

from __future__ import annotations

import importlib
import traceback

from .common import REPO, Sheet, edgekb_env, log

EVAL_DIR = REPO / "tests" / "data" / "eval"
KEYS = ("hit_at_3_hybrid", "hit_at_3_vector", "hit_at_3_keyword")


def run(sheet: Sheet) -> None:
    try:
        evaluation = importlib.import_module("edgekb.evaluation")
    except ImportError as exc:
        for key in KEYS:
            sheet.put(key, None, f"edgekb.evaluation not importable: {exc}")
        return
    log("retrieval: edgekb.evaluation.evaluate over tests/data/eval (embedder only)")
    try:
        result = evaluation.evaluate(EVAL_DIR, env=edgekb_env(), k=3)
    except Exception as exc:  # noqa: BLE001 - a failed evaluation leaves its figures null
        for key in KEYS:
            sheet.put(key, None, f"edgekb.evaluation.evaluate failed: {exc!r}")
        sheet.detail("retrieval_error", traceback.format_exc(limit=3))
        return
    described = f"{result.get('questions')} questions over {result.get('documents')} documents" \
        f" ({result.get('chunks')} chunks) of tests/data/eval + demo manuals"
    for key in KEYS:
        mode = key.rsplit("_", 1)[1]
        sheet.put(key, result.get(key), f"share of questions whose answering chunk is in the "
                  f"top 3 of {mode} search; {described}; 1 run (deterministic)")
    sheet.detail("retrieval", {k: v for k, v in result.items()
                               if k not in ("results", "categories")})
