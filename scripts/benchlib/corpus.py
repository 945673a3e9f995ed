"""Generated manuals and questions: deterministic, technical-looking, any size."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "pump", "valve", "seal", "bearing", "impeller", "shaft", "motor", "coupling", "gasket",
    "flange", "pressure", "temperature", "flow", "rate", "discharge", "suction", "inlet", "outlet",
    "filter", "strainer", "lubricant", "grease", "oil", "level", "sensor", "switch", "relay",
    "contactor", "breaker", "fuse", "terminal", "cable", "conduit", "panel", "controller",
    "display", "alarm", "fault", "trip", "reset", "interlock", "guard", "cover", "housing",
    "bracket", "bolt", "nut", "washer", "torque", "tension", "belt", "pulley", "idler", "roller",
    "conveyor", "gearbox", "reducer", "coupling", "alignment", "vibration", "noise", "leak",
    "drain", "vent", "check", "inspect", "replace", "adjust", "tighten", "loosen", "clean",
    "measure", "record", "verify", "lock", "isolate", "restore", "start", "stop", "run", "idle",
    "load", "unload", "cycle", "interval", "hour", "week", "month", "shift", "operator",
    "technician", "supervisor", "manual", "procedure", "step", "warning", "caution", "note",
    "limit", "value", "setting", "parameter", "range", "minimum", "maximum", "nominal", "rated",
    "speed", "power", "voltage", "current", "phase", "frequency", "compressor", "cooler", "fan",
    "radiator", "thermostat", "hose", "clamp", "fitting", "nipple", "elbow", "tee", "reducer",
    "manifold", "gauge", "reading", "tolerance", "clearance", "gap", "wear",
)
UNITS = ("bar", "°C", "mm", "Nm", "rpm", "kW", "h", "l/min", "V", "A")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 18))]
    if rng.random() < 0.5:
        words.insert(rng.randrange(len(words)), f"{rng.randint(1, 400)} {rng.choice(UNITS)}")
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), f"E-{rng.randint(100, 999)}")
    return " ".join(words).capitalize() + "."


def write_manuals(folder: Path, target_chunks: int, seed: int = 1) -> None:
    """Markdown manuals of about ``target_chunks`` 200-token chunks (five sections a file,
    about four chunks a section)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sections_needed = max(1, target_chunks // 4)
    for number in range((sections_needed + 4) // 5):
        lines = [f"# Unit {number:04d} {rng.choice(WORDS)} {rng.choice(WORDS)} manual", ""]
        for section in range(5):
            lines += [f"## {section + 1}. {rng.choice(WORDS).capitalize()} {rng.choice(WORDS)}", ""]
            for _ in range(6):  # about 80 words a paragraph
                lines += [" ".join(_sentence(rng) for _ in range(6)), ""]
        (folder / f"unit-{number:04d}.md").write_text("\n".join(lines), encoding="utf-8")


def questions(count: int, seed: int = 2) -> list[str]:
    rng = random.Random(seed)
    return [f"How do I {rng.choice(WORDS)} the {rng.choice(WORDS)} {rng.choice(WORDS)} after a "
            f"{rng.choice(WORDS)} {rng.choice(WORDS)}?" for _ in range(count)]
