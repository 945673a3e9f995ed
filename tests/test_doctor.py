"""`edgekb doctor` on real data dirs: each check fails when its thing is broken, names what to
do, and the command exits non-zero only for problems."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import edgekb_env, run_edgekb

from edgekb import doctor
from edgekb.boards import llm_name
from edgekb.config import Settings
from edgekb.doctor import Finding


@pytest.fixture
def data_dir(tmp_path: Path, demo_data_dir: Path) -> Path:
    """A healthy data dir of our own to break: the demo manuals, closed to other users."""
    copy = tmp_path / "data"
    shutil.copytree(demo_data_dir, copy, ignore=shutil.ignore_patterns("edgekb.lock"))
    copy.chmod(0o700)
    return copy


def findings(data_dir: Path, models_cache: Path, **extra: str) -> list[Finding]:
    result = run_edgekb(["doctor", "--json", "--data-dir", str(data_dir)],
                        edgekb_env(models_cache, **extra))
    found = [Finding(**json.loads(line)) for line in result.stdout.splitlines()]
    problems = [f for f in found if f.level == "problem"]
    assert result.returncode == (1 if problems else 0), result.stderr
    return found


def of(found: list[Finding], check: str, level: str) -> list[Finding]:
    return [f for f in found if f.check == check and f.level == level]


def test_a_healthy_appliance_has_no_problem(data_dir: Path, models_cache: Path) -> None:
    found = findings(data_dir, models_cache)
    assert not [f for f in found if f.level == "problem"], found
    assert {f.check for f in found} >= {"config", "models", "database", "index", "disk",
                                        "clock", "permissions"}
    result = run_edgekb(["doctor", "--data-dir", str(data_dir)], edgekb_env(models_cache))
    assert result.returncode == 0 and "0 problem(s)" in result.stderr


def test_bad_settings_are_a_problem(tmp_path: Path, models_cache: Path) -> None:
    config = tmp_path / "edgekb.yaml"
    config.write_text("retention:\n  max_mb: lots\n")
    result = run_edgekb(["doctor", "--config", str(config)], edgekb_env(models_cache))
    assert result.returncode == 1
    assert "PROBLEM  config" in result.stdout and "retention.max_mb" in result.stdout
    assert "fix: edgekb config check" in result.stdout


def test_missing_and_corrupt_models_name_the_fetch_command(data_dir: Path, models_cache: Path,
                                                           tmp_path: Path) -> None:
    cache = tmp_path / "models"
    shutil.copytree(models_cache / "minilm-l6-int8", cache / "minilm-l6-int8")
    tokenizer = next((cache / "minilm-l6-int8").glob("*.json"))
    tokenizer.write_text(tokenizer.read_text().replace("[UNK]", "[UNX]", 1))
    found = of(findings(data_dir, cache), "models", "problem")
    by_model = {f.message.split(":")[0]: f for f in found}
    llm = llm_name(Settings())  # models.llm is auto: the one for this machine's memory
    assert by_model[llm].fix == f"edgekb models fetch {llm}"
    assert "missing" in by_model[llm].message
    assert by_model["minilm-l6-int8"].fix == "edgekb models fetch --force minilm-l6-int8"
    assert tokenizer.name in by_model["minilm-l6-int8"].message


def test_an_unknown_model_name_is_a_problem(data_dir: Path, models_cache: Path) -> None:
    found = of(findings(data_dir, models_cache, EDGEKB_MODELS__LLM="gemma9"), "models",
               "problem")
    assert "unknown model 'gemma9'" in found[0].message and "models.llm" in found[0].fix


def test_a_stale_index_file_is_a_problem_fixed_by_a_restart(data_dir: Path,
                                                            models_cache: Path) -> None:
    index = data_dir / "index-default.bin"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x01
    index.write_bytes(bytes(data))
    found = of(findings(data_dir, models_cache), "index", "problem")
    assert "checksum does not match" in found[0].message
    assert "restart edgekb" in found[0].fix


def test_schema_versions_newer_older_and_a_damaged_database(data_dir: Path,
                                                            models_cache: Path) -> None:
    db = data_dir / "edgekb.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    newer = of(findings(data_dir, models_cache), "database", "problem")
    assert "newer edgekb" in newer[0].message
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    older = of(findings(data_dir, models_cache), "database", "warning")
    assert "the next start migrates it" in older[0].message
    assert "backups" in older[0].fix

    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 3")
    conn.execute("PRAGMA journal_mode = DELETE")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    with db.open("r+b") as f:  # scribble over the middle page of the file
        f.seek(4096 * (pages // 2))
        f.write(os.urandom(4096))
    damaged = of(findings(data_dir, models_cache), "database", "problem")
    assert damaged and "edgekb restore" in damaged[0].fix


def test_low_disk_space_is_a_problem(data_dir: Path, models_cache: Path) -> None:
    found = of(findings(data_dir, models_cache, EDGEKB_STORAGE__MIN_FREE_MB="1000000"),
               "disk", "problem")
    assert "below storage.min_free_mb" in found[0].message and "backups" in found[0].fix


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_few_free_inodes_are_a_problem(tmp_path: Path, models_cache: Path) -> None:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=2200,mode=700",
                    "tmpfs", str(mount)], check=True)
    try:
        data_dir = mount / "data"
        data_dir.mkdir(mode=0o700)
        floor = {"EDGEKB_STORAGE__MIN_FREE_MB": "1"}  # the space is fine, the inodes are not
        assert not of(findings(data_dir, models_cache, **floor), "disk", "problem")
        for n in range(300):
            (data_dir / f"f{n}").touch()
        found = of(findings(data_dir, models_cache, **floor), "disk", "problem")
        assert "inodes free" in found[0].message
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_clock_never_set_or_gone_back_is_a_problem(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir)
    never_set = doctor.check_clock(settings, now=86400.0)  # 2 January 1970
    assert never_set[0].level == "problem" and "never set" in never_set[0].message
    assert "timedatectl" in never_set[0].fix
    conn = sqlite3.connect(data_dir / "edgekb.db")
    newest = conn.execute("SELECT max(ingested_at) FROM documents").fetchone()[0]
    conn.close()
    gone_back = doctor.check_clock(settings, now=newest - 86400)
    assert gone_back[0].level == "problem" and "went back" in gone_back[0].message
    assert doctor.check_clock(settings, now=time.time())[0].level in ("ok", "warning")


def test_open_permissions_are_problems(data_dir: Path, models_cache: Path) -> None:
    auth = data_dir / "auth"
    auth.mkdir(mode=0o750)
    key = auth / "keys.json"
    key.write_text("{}")
    key.chmod(0o640)
    data_dir.chmod(0o750)  # the group may enter: the key must be closed to it
    found = of(findings(data_dir, models_cache), "permissions", "problem")
    assert [f.message.split(" ")[0] for f in found] == [str(key)]
    assert found[0].fix.startswith(f"chmod 600 {key}")
    auth.chmod(0o700)  # the group cannot enter auth/ any more
    assert not of(findings(data_dir, models_cache), "permissions", "problem")
    data_dir.chmod(0o777)
    found = of(findings(data_dir, models_cache), "permissions", "problem")
    assert "writable by every user" in found[0].message
    assert any("conversations" in f.message for f in found)  # others can read the database
    data_dir.chmod(0o700)
    assert not of(findings(data_dir, models_cache), "permissions", "problem")


def make_pair(folder: Path, name: str, days: int = 90) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", str(days), "-subj",
                    "/CN=edgekb-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test pairs")
def test_tls_files_that_are_wrong_are_problems(tmp_path: Path) -> None:
    cert, key = make_pair(tmp_path, "good")
    other_cert, _ = make_pair(tmp_path, "other")
    now = time.time()
    assert [f.level for f in doctor.check_tls(str(cert), str(key), now)] == ["ok"]
    assert doctor.check_tls("", "", now)[0].level == "ok"  # plain http: nothing to check
    assert "only one" in doctor.check_tls(str(cert), "", now)[0].message
    assert "does not exist" in doctor.check_tls(str(tmp_path / "no.crt"), str(key), now)[0].message
    mismatch = doctor.check_tls(str(other_cert), str(key), now)
    assert mismatch[0].level == "problem" and "do not load as a pair" in mismatch[0].message
    expired = doctor.check_tls(str(cert), str(key), now + 100 * 86400)
    assert expired[0].level == "problem" and "expired" in expired[0].message
    soon = doctor.check_tls(str(cert), str(key), now + 70 * 86400)
    assert soon[0].level == "warning" and "expires" in soon[0].message
    early = doctor.check_tls(str(cert), str(key), now - 86400)
    assert early[0].level == "problem" and "clock" in early[0].message
    key.chmod(0o644)
    readable = doctor.check_tls(str(cert), str(key), now)
    assert readable[0].level == "problem" and readable[0].fix == f"chmod 600 {key}"
