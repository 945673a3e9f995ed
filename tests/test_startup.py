"""Start-up refuses what it cannot trust: bad settings, missing or corrupt models."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import edgekb_env, run_edgekb


def test_bad_config_file_is_reported_with_key_paths(tmp_path: Path, models_cache: Path) -> None:
    config = tmp_path / "edgekb.yaml"
    config.write_text("server:\n  port: eighty\n  hots: 0.0.0.0\nretrieval:\n  k: 0\n")
    result = run_edgekb(["config", "check", "--config", str(config)], edgekb_env(models_cache))
    assert result.returncode == 2
    assert "server.port" in result.stderr
    assert "did you mean 'server.host'" in result.stderr
    assert "retrieval.k" in result.stderr
    serve = run_edgekb(["serve", "--config", str(config), "--port", "0"],
                       edgekb_env(models_cache))
    assert serve.returncode == 2 and "server.port" in serve.stderr


def test_corrupted_model_is_refused(tmp_path: Path, models_cache: Path) -> None:
    cache = tmp_path / "models"
    shutil.copytree(models_cache / "minilm-l6-int8", cache / "minilm-l6-int8")
    shutil.copytree(models_cache / "qwen25-coder-05b", cache / "qwen25-coder-05b")
    onnx = cache / "minilm-l6-int8" / "minilm-l6-int8.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))

    result = run_edgekb(["serve", "--data-dir", str(tmp_path / "data"), "--port", "0"],
                        edgekb_env(cache))
    assert result.returncode == 2
    assert "checksum_mismatch" in result.stderr and "minilm-l6-int8.onnx" in result.stderr
    assert "edgekb ready" not in result.stderr

    listing = run_edgekb(["models", "list"], edgekb_env(cache), check=True)
    assert any("minilm-l6-int8" in line and "corrupt" in line
               for line in listing.stdout.splitlines())


def test_missing_model_names_the_fetch_command(tmp_path: Path, models_cache: Path) -> None:
    result = run_edgekb(["serve", "--data-dir", str(tmp_path / "data"), "--port", "0"],
                        edgekb_env(tmp_path / "empty-cache"))
    assert result.returncode == 2
    assert "edgekb models fetch" in result.stderr


def test_reingesting_unchanged_files_does_nothing(tmp_path: Path, models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    data_dir = str(tmp_path / "data")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "valve.md").write_text("# Valve V-9\n\n## Opening\n\nTurn the handwheel left.\n")
    first = run_edgekb(["ingest", str(docs), "--data-dir", data_dir], env, check=True)
    assert "1 added" in first.stderr
    second = run_edgekb(["ingest", str(docs), "--data-dir", data_dir], env, check=True)
    assert "0 added, 0 updated, 1 unchanged" in second.stderr
    (docs / "valve.md").write_text("# Valve V-9\n\n## Opening\n\nTurn the handwheel right.\n")
    third = run_edgekb(["ingest", str(docs), "--data-dir", data_dir], env, check=True)
    assert "1 updated" in third.stderr
