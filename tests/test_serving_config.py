"""The serve stage's config: NAME=PATH entries checked up front, one-line errors, the Serve config file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.config import ConfigError, build_config
from serving.app import Config

REPO = Path(__file__).resolve().parents[1]


def config_error(**values) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(Config, values=values)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_model_entries_are_parsed_and_checked(serving_checkpoint, tmp_path):
    config = build_config(Config, values={"models": [f"chat={serving_checkpoint}"], "port": 9001})
    entry = config.models[0]
    assert (entry.name, entry.format, entry.max_context) == ("chat", "groundup", 256)
    assert Path(entry.path).is_absolute()
    assert "no such directory" in config_error(models=[f"chat={tmp_path / 'missing'}"])
    assert "no config.json" in config_error(models=[f"chat={tmp_path}"])
    assert "NAME=PATH" in config_error(models=["just-a-path"])
    assert "given twice" in config_error(models=[f"a={serving_checkpoint}", f"a={serving_checkpoint}"])
    assert "at least one model" in config_error(models=[])
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text((serving_checkpoint / "config.json").read_text())
    assert "tokenizer.model" in config_error(models=[f"x={incomplete}"])


def test_model_version_follows_the_weights(serving_checkpoint, tmp_path):
    import shutil

    import torch

    from model.checkpoint import load_model, load_tokenizer, save_checkpoint

    first = build_config(Config, values={"models": [f"a={serving_checkpoint}"]}).models[0].version
    copy = tmp_path / "copy"
    shutil.copytree(serving_checkpoint, copy)
    assert build_config(Config, values={"models": [f"a={copy}"]}).models[0].version == first  # same bytes
    model = load_model(copy)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(model, copy, load_tokenizer(copy))  # new weights under the same path and name
    second = build_config(Config, values={"models": [f"a={copy}"]}).models[0].version
    assert second != first and len(second) == len(first) == 12


def test_hf_export_is_accepted(serving_checkpoint, tmp_path):
    from model.checkpoint import load_model, load_tokenizer
    from model.hf import export_hf

    export_hf(load_model(serving_checkpoint), tmp_path / "hf", load_tokenizer(serving_checkpoint))
    entry = build_config(Config, values={"models": [f"hf={tmp_path / 'hf'}"]}).models[0]
    assert entry.format == "hf" and entry.max_context == 256


def test_cli_prints_config_and_reports_bad_model_in_one_line(serving_checkpoint, tmp_path, capsys):
    assert main(["serve", "--model", f"a={serving_checkpoint}", "--model", f"b={serving_checkpoint}",
                 "--port", "9100", "--no-ui", "--api-key", "k1", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in printed["models"]] == ["a", "b"]
    assert printed["port"] == 9100 and printed["ui"] is False and printed["api_keys"] == ["k1"]
    assert main(["serve", "--model", f"a={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a=" in err and "no such directory" in err


def test_serve_config_file_matches_config_fields():
    document = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    imports = {app["import_path"] for app in document["applications"]}
    assert imports == {"serving.app:app_builder", "serving.app:ui_app_builder"}
    for app in document["applications"]:
        fields = set(app["args"]) - {"models"}
        assert fields <= set(Config.model_fields), fields - set(Config.model_fields)


def test_hf_export_serves_the_same_greedy_answer(serving_checkpoint, tmp_path):
    import torch

    from model.checkpoint import load_model, load_tokenizer
    from model.generate import SamplingParams
    from model.hf import export_hf
    from serving.engine import Engine
    from serving.model_server import load_for_serving

    tokenizer = load_tokenizer(serving_checkpoint)
    export_hf(load_model(serving_checkpoint), tmp_path / "hf", tokenizer)
    prompt = tokenizer.encode("The history of", bos=True)
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=())
    answers = []
    for path in (serving_checkpoint, tmp_path / "hf"):
        engine = Engine(*load_for_serving(path, torch.device("cpu")), max_batch_size=2)
        events = []
        engine.submit(prompt, params, events.append)
        engine.run_until_idle()
        answers.append([e.token_id for e in events])
    assert answers[0] == answers[1] and len(answers[0]) == 8


def test_serving_dtype_defaults_to_fp32_on_cpu_and_bf16_serves(serving_checkpoint):
    """dtype=auto keeps fp32 on CPU; dtype=bfloat16 loads bf16 weights and a bf16 KV cache, generates the
    requested tokens, and its logits stay within bf16 rounding of fp32's."""
    import pytest
    import torch

    from model.generate import SamplingParams
    from serving.engine import Engine
    from serving.model_server import load_for_serving, serving_dtype

    cpu = torch.device("cpu")
    assert serving_dtype("auto", cpu) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        serving_dtype("float16x", cpu)
    answers, logits = {}, {}
    for name in ("float32", "bfloat16"):
        model, tokenizer = load_for_serving(serving_checkpoint, cpu, name)
        engine = Engine(model, tokenizer, max_batch_size=2)
        assert next(model.parameters()).dtype == engine.decoder.cache.keys[0].dtype == serving_dtype(name, cpu)
        prompt = tokenizer.encode("The history of", bos=True)
        with torch.inference_mode():
            logits[name] = model(torch.tensor([prompt])).float()
        events = []
        engine.submit(prompt,
                      SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=()), events.append)
        engine.run_until_idle()
        answers[name] = [e.token_id for e in events]
    assert len(answers["bfloat16"]) == len(answers["float32"]) == 8
    scale = logits["float32"].abs().max()
    assert (logits["bfloat16"] - logits["float32"]).abs().max() <= 0.05 * scale
