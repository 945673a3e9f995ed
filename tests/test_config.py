"""Settings as a user meets them: file, environment, flags, and the messages when they are wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from edgekb.config import (
    DEFAULT_CONFIG_FILE,
    GenerationSettings,
    ServerSettings,
    Settings,
    load_settings,
    parse_set_option,
    schema_defaults,
    settings_to_yaml,
)
from edgekb.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "edgekb.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.problems


def test_defaults_load_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.data_dir == tmp_path / ".local/share/edgekb"
    assert settings.server.port == 8080 and settings.server.host == "127.0.0.1"
    assert settings.generation.temperature == 0.0
    assert settings.db_path == settings.data_dir / "edgekb.db"
    assert settings.docs_dir == settings.data_dir / "docs"
    assert settings.models_cache == settings.data_dir / "models"
    assert settings.manifest_path is None


def test_a_file_overrides_only_the_keys_it_names(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = write(tmp_path, """
data_dir: ~/kb
server:
  port: 9001
models:
  cache_dir: /srv/models
  manifest: ~/my-models.toml
generation:
  temperature: 1        # an integer where a number is expected is fine
retrieval:              # a section with every key commented out keeps its defaults
""")
    settings = load_settings(config, env={})
    assert settings.data_dir == tmp_path / "kb"
    assert settings.server == ServerSettings(port=9001)
    assert settings.models_cache == Path("/srv/models")
    assert settings.manifest_path == tmp_path / "my-models.toml"
    assert settings.generation.temperature == 1.0
    assert isinstance(settings.generation.temperature, float)
    assert settings.retrieval.k == 4
    assert settings.chunking.chunk_tokens == 200


def test_an_empty_file_means_all_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing set\n"), env={}) == load_settings(env={})


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    config = write(tmp_path, "server:\n  port: 8081\n  host: 0.0.0.0\nretrieval:\n  k: 5\n")
    env = {"EDGEKB_SERVER__PORT": "8082", "EDGEKB_GENERATION__TEMPERATURE": "0.7",
           "EDGEKB_DATA_DIR": str(tmp_path / "from-env")}
    settings = load_settings(config, env=env, overrides={"server.port": 9000})
    assert settings.server.port == 9000  # override beats env beats file
    assert settings.server.host == "0.0.0.0"  # file beats default
    assert settings.retrieval.k == 5
    assert settings.generation.temperature == 0.7  # env beats default
    assert settings.data_dir == tmp_path / "from-env"

    assert load_settings(config, env=env).server.port == 8082
    # The CLI may pass every flag it has; an unset one (None) changes nothing.
    unset = load_settings(config, env=env, overrides={"server.port": None, "data_dir": None})
    assert unset.server.port == 8082


def test_edgekb_config_names_the_file_unless_one_is_given(tmp_path: Path) -> None:
    named = write(tmp_path, "server:\n  port: 7001\n", "named.yaml")
    given = write(tmp_path, "server:\n  port: 7002\n", "given.yaml")
    env = {"EDGEKB_CONFIG": str(named)}
    assert load_settings(env=env).server.port == 7001
    assert load_settings(given, env=env).server.port == 7002


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as excinfo:
        load_settings(tmp_path / "nope.yaml", env={})
    assert "nope.yaml" in str(excinfo.value)
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_settings(env={"EDGEKB_CONFIG": str(tmp_path / "nope.yaml")})


def test_every_problem_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    config = write(tmp_path, """
server:
  port: abc
  prot: 9000
  heartbeat_s: 0
retrieval:
  k: 99
generation:
  max_tokens: true
sever:
  host: x
chunking:
  overlap_tokens: 300
threads: 2
""")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config, env={})
    assert problems_of(excinfo) == [
        "server.port: expected an integer, got 'abc'",
        "unknown key 'server.prot' (did you mean 'server.port'?)",
        "server.heartbeat_s: must be greater than 0, got 0.0",
        "retrieval.k: must be between 1 and 50, got 99",
        "generation.max_tokens: expected an integer, got true",
        "unknown key 'sever' (did you mean 'server'?)",
        "unknown key 'threads' (did you mean 'embedding.threads' or 'generation.threads'?)",
        "chunking.overlap_tokens: must be less than chunking.chunk_tokens (200), got 300",
    ]
    message = str(excinfo.value)
    assert str(config) in message and "8 problem(s)" in message


def test_a_section_that_is_not_a_mapping_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, "server: 8080\nretrieval:\n  k: 0\n"), env={})
    assert problems_of(excinfo) == ["server: expected a mapping of keys, got 8080",
                                    "retrieval.k: must be between 1 and 50, got 0"]


def test_port_zero_means_any_free_port_but_out_of_range_is_refused(tmp_path: Path) -> None:
    assert load_settings(env={}, overrides={"server.port": 0}).server.port == 0
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={}, overrides={"server.port": 70000})
    assert problems_of(excinfo) == [
        "server.port (command line): must be between 1 and 65535 (or 0 for any free port), "
        "got 70000"]


def test_unparseable_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    config = write(tmp_path, "server:\n  port: 8080\n  host: [unclosed\nretrieval:\n  k: 4\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config, env={})
    (problem,) = problems_of(excinfo)
    assert problem.startswith(f"{config}, line ")
    assert "not valid YAML" in problem
    line = int(re.search(r"line (\d+)", problem).group(1))  # type: ignore[union-attr]
    assert line == 4  # where the parser gave up; the line the bracket opened is named too
    assert "on line 3" in problem


@pytest.mark.parametrize("text", ["- a\n- b\n", "just words\n"])
def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    config = write(tmp_path, text)
    with pytest.raises(ConfigError, match="top level must be a mapping") as excinfo:
        load_settings(config, env={})
    assert str(config) in str(excinfo.value)


def test_environment_problems_name_the_variable() -> None:
    env = {
        "EDGEKB_SERVER__PORT": "abc",
        "EDGEKB_GENERATION__TEMPERATURE": "3",
        "EDGEKB_SERVER__PROT": "1",
        "EDGEKB_DATADIR": "/x",
        "EDGEKB_CONFIG": "",  # the file variable, not a setting
        "EDGEKB_LOG_STYLE": "plain",  # not shaped like a setting: left to whoever reads it
        "PATH": "/bin",
    }
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env=env)
    assert problems_of(excinfo) == [
        "EDGEKB_DATADIR: unknown setting variable (did you mean 'EDGEKB_DATA_DIR'?)",
        "EDGEKB_GENERATION__TEMPERATURE: must be between 0 and 2, got 3.0",
        "EDGEKB_SERVER__PORT: expected an integer, got 'abc'",
        "EDGEKB_SERVER__PROT: unknown setting variable (did you mean 'EDGEKB_SERVER__PORT'?)",
    ]
    assert "the environment" in str(excinfo.value)


def test_problems_from_every_source_are_reported_together(tmp_path: Path) -> None:
    config = write(tmp_path, "retrieval:\n  k: 0\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config, env={"EDGEKB_SERVER__PORT": "x"},
                      overrides={"chunking.chunk_tokens": "9", "server.hots": "h",
                                 "generation.port": 1})
    assert problems_of(excinfo) == [
        "retrieval.k: must be between 1 and 50, got 0",
        "EDGEKB_SERVER__PORT: expected an integer, got 'x'",
        "chunking.chunk_tokens (command line): must be between 32 and 512, got 9",
        "server.hots (command line): unknown key (did you mean 'server.host'?)",
        "generation.port (command line): unknown key (did you mean 'server.port'?)",
    ]
    assert f"{config}, the environment, the command line" in str(excinfo.value)


def test_set_options_are_parsed_by_the_schema() -> None:
    overrides = dict(parse_set_option(text) for text in [
        "server.port=9000", "generation.temperature = 0.5", "server.host=::1", "data_dir=/a=b"])
    assert overrides == {"server.port": "9000", "generation.temperature": "0.5",
                         "server.host": "::1", "data_dir": "/a=b"}
    settings = load_settings(env={}, overrides=overrides)
    assert settings.server.port == 9000
    assert settings.generation.temperature == 0.5
    assert settings.server.host == "::1"
    assert settings.data_dir == Path("/a=b")


@pytest.mark.parametrize("text", ["server.port", "=9000", ""])
def test_a_malformed_set_option_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set_option(text)


def test_settings_to_yaml_round_trips(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={
        "data_dir": tmp_path / "kb", "server.host": "0.0.0.0", "server.port": 8443,
        "server.heartbeat_s": 7.5, "models.manifest": str(tmp_path / "m.toml"),
        "models.llm": "123", "generation.temperature": 1.25, "generation.seed": 42})
    text = settings_to_yaml(settings)
    assert load_settings(write(tmp_path, text), env={}) == settings
    assert load_settings(write(tmp_path, settings_to_yaml(Settings()), "d.yaml"),
                         env={}) == Settings()


def test_settings_built_directly_are_normalised(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings(data_dir=Path("~/kb"), generation=GenerationSettings(max_tokens=8))
    assert settings.data_dir == tmp_path / "kb"
    assert settings.generation.max_tokens == 8


def test_the_defaults_file_matches_the_schema() -> None:
    shipped = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text(encoding="utf-8"))
    expected = schema_defaults()

    def leaves(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    shipped_leaves, expected_leaves = leaves(shipped), leaves(expected)
    assert list(shipped_leaves) == list(expected_leaves)  # same keys, same order
    for key, value in expected_leaves.items():
        assert (type(shipped_leaves[key]), shipped_leaves[key]) == (type(value), value), key
    # And the shipped file is itself a valid config file.
    assert load_settings(DEFAULT_CONFIG_FILE, env={}) == load_settings(env={})


def test_the_defaults_file_documents_every_key() -> None:
    lines = DEFAULT_CONFIG_FILE.read_text(encoding="utf-8").splitlines()
    keys = 0
    for number, line in enumerate(lines):
        if not re.match(r"\s*[a-z_]+:", line):
            continue
        keys += 1
        above = lines[number - 1].strip() if number else ""
        assert "#" in line or above.startswith("#"), f"line {number + 1} has no comment: {line}"
    assert keys == len(schema_defaults()) + sum(
        len(v) for v in schema_defaults().values() if isinstance(v, dict))
