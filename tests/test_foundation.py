"""The built-in corpus, typed configs with overrides, run directories and the CLI's error handling."""
from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import Field

from pipelines.config import ConfigError, StageConfig, StrictModel, build_config, parse_override
from pipelines.data.builtin import iter_builtin_documents
from pipelines.rundir import RunDir, local_copy, new_manifest, remove, upload


def test_builtin_corpus_shape_size_and_stable_ids():
    docs = list(iter_builtin_documents())
    assert {"id", "text", "source", "meta"} <= set(docs[0])
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids))
    assert sum(len(d["text"].encode()) for d in docs) > 1_500_000
    assert any(i.startswith("pydoc:") for i in ids) and any(i.startswith("stdlib:") for i in ids)
    assert ids == [d["id"] for d in iter_builtin_documents()]  # same order every time


class _Inner(StrictModel):
    size: int = Field(4, ge=1)
    name: str = "x"


class _Config(StageConfig):
    inner: _Inner = _Inner()
    ratio: float = 0.5
    tags: list[str] = []


def test_config_layers_yaml_values_and_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("inner:\n  size: 8\nratio: 0.1\n")
    config = build_config(_Config, recipe, ["inner.name=abc", "tags=[a, b]", "seed=3"], {"ratio": 0.2})
    assert (config.inner.size, config.inner.name, config.ratio, config.tags, config.seed) == (8, "abc", 0.2,
                                                                                             ["a", "b"], 3)


@pytest.mark.parametrize("override, field", [
    (["inner.size=0"], "inner.size"),
    (["inner.colour=red"], "inner.colour"),
    (["ratio=lots"], "ratio"),
])
def test_config_errors_are_one_line_naming_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        build_config(_Config, overrides=override)
    message = str(info.value)
    assert f"'{field}'" in message and "\n" not in message


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(_Config, bad)
    with pytest.raises(ConfigError, match="not found"):
        build_config(_Config, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


def test_run_directory_writes_atomically_and_reads_manifests(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_json("stage/out.json", {"a": 1})
    assert run.read_json("stage/out.json") == {"a": 1}
    assert not [p for p in (tmp_path / "run" / "stage").iterdir() if ".tmp-" in p.name]
    with pytest.raises(ConfigError, match="groundup data"):
        run.read_manifest("data")
    manifest = new_manifest("data", _Config(), started=0.0, counts={"kept": 3})
    run.write_manifest("data", manifest)
    assert run.read_manifest("data")["counts"] == {"kept": 3}
    assert run.read_manifest("data")["config"]["inner"]["size"] == 4


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_help_lists_stages():
    result = _cli("--help")
    assert result.returncode == 0
    for stage in ("quickstart", "data", "pretrain", "serve", "prefs"):
        assert stage in result.stdout


def test_stage_help_lists_the_stage_flags():
    for stage, flag in (("data", "--input"), ("pretrain", "--tokens-per-parameter"), ("serve", "--stream-interval")):
        result = _cli(stage, "--help")
        assert result.returncode == 0 and flag in result.stdout and "key=value" in result.stdout, stage


def test_cli_unknown_command_and_bad_override_exit_2_with_one_line():
    unknown = _cli("frobnicate")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    bad = _cli("quickstart", "no_such_field=1")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "no_such_field" in bad.stderr and "Traceback" not in bad.stderr


def test_object_store_copies_are_fetched_once_per_version(object_store, tmp_path, monkeypatch):
    """local_copy downloads an object-store file or directory once per node and again when it changes;
    upload and remove round-trip directories; a missing object is a one-line error naming it."""
    monkeypatch.setenv("GROUNDUP_CACHE", str(tmp_path / "cache"))
    run = RunDir(f"s3://{object_store}/foundation/copies")
    run.write_text("dir/a.txt", "one")
    first = local_copy(run.uri_of("dir/a.txt"))
    assert first.read_text() == "one" and first.is_relative_to(tmp_path / "cache")
    assert local_copy(run.uri_of("dir/a.txt")) == first
    run.write_text("dir/a.txt", "two, longer")
    assert local_copy(run.uri_of("dir/a.txt")).read_text() == "two, longer"
    assert (local_copy(run.uri_of("dir")) / "a.txt").read_text() == "two, longer"
    with pytest.raises(ConfigError, match=r"foundation/copies/missing\.txt: not found"):
        local_copy(run.uri_of("missing.txt"))

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "b.bin").write_bytes(b"\x00\x01")
    upload(tree, run.uri_of("tree"))
    assert run.read_bytes("tree/sub/b.bin") == b"\x00\x01"
    remove(run.uri_of("tree"))
    assert not run.exists("tree") and not run.exists("tree/sub/b.bin")
    assert local_copy(str(tree)) == tree  # local paths come back as they are


def test_parse_module_survives_cpython_311_ast_race(monkeypatch, tmp_path):
    """CPython 3.11's ast.parse raises SystemError ("AST constructor recursion depth mismatch") when another
    thread parses at the same time (it failed the built-in corpus test once Ray's threads ran in the test
    process); the same file parses on retry, so one collision never drops a module from the corpus."""
    import ast

    from pipelines.data import builtin

    real, calls = ast.parse, []

    def collides_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=129, after=71)")
        return real(*args, **kwargs)

    monkeypatch.setattr(builtin.ast, "parse", collides_once)
    module = tmp_path / "documented.py"
    module.write_text('"""A module docstring."""\n')
    tree = builtin.parse_module(module)
    assert tree is not None and ast.get_docstring(tree) == "A module docstring." and len(calls) == 2
