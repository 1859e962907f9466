"""Post-training on the session Ray cluster with real DeepSpeed: SFT, the reward model and DPO as Tasks of
the one training core, their data checks, LoRA, resume and ZeRO-3, and the votes -> pairs -> reward loop.

One base model is pretrained once for the module (the 1m preset with a 128-token context, so built-in
conversations fit); one SFT run is shared by the reward and DPO tests. Every learning claim is checked
on validation examples about modules the model never saw in training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_with_data

pytestmark = pytest.mark.ray

BASE_OVERRIDES = ("model=1m", "model_overrides.max_seq_len=128", "sequence_length=64", "seed=0",
                  "train.num_workers=1", "train.precision.dtype=fp32", "train.length.steps=40",
                  "train.batch.micro_batch_size=16", "train.batch.global_batch_tokens=2048",
                  "train.optimizer.lr=3e-3", "train.schedule.warmup_steps=2", "train.checkpoint.every_steps=40",
                  "train.eval.every_steps=40", "train.eval.max_rows=16", "train.eval.samples=0", "train.log_every=20")
# Two workers, fp32 so ZeRO stages and resumed runs compare exactly; a validation set that gives the two
# ranks different numbers of batches (5 rows in micro-batches of 2: rank 0 two batches, rank 1 one).
COMMON = ("train.num_workers=2", "train.precision.dtype=fp32", "train.batch.micro_batch_size=2",
          "train.schedule.warmup_steps=2", "train.log_every=1", "train.checkpoint.every_steps=2")


def _build(module, run: Path, *overrides: str):
    from pipelines.config import build_config

    return build_config(module.Config, overrides=[f"run={run}", *overrides])


def _assert_one_line_errors(cases: list[tuple[list[str], str]]) -> None:
    """Each command exits with status 2 and one line on stderr that names the culprit (``needle``)."""
    for argv, needle in cases:
        result = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], check=False, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2, (argv, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (argv, result.stderr)


def _train_losses(run: Path, stage: str) -> dict[int, float]:
    from pipelines.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run / stage / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def base_run(builtin_data_dir, tmp_path_factory):
    from pipelines import pretrain

    run = run_with_data(tmp_path_factory, builtin_data_dir, "posttrain-base")
    pretrain.run(_build(pretrain, run, *BASE_OVERRIDES))
    return run


SFT_SETTINGS = ("train.num_workers=2", "train.length.steps=30", "train.batch.micro_batch_size=8",
                "train.batch.global_batch_sequences=32", "train.optimizer.lr=2e-3", "train.eval.every_steps=30",
                "train.eval.max_rows=64", "train.precision.dtype=fp32")
REWARD_SETTINGS = ("train.num_workers=2", "train.length.steps=40", "train.batch.micro_batch_size=8",
                   "train.batch.global_batch_sequences=32", "train.optimizer.lr=1e-3", "train.eval.every_steps=40",
                   "train.eval.max_rows=200", "train.precision.dtype=fp32")


@pytest.fixture(scope="module")
def sft_run(base_run):
    """SFT of the base model on the built-in instruction set (2 workers, ZeRO-0)."""
    from pipelines import sft

    return base_run, sft.run(_build(sft, base_run, *SFT_SETTINGS))


# ---- SFT --------------------------------------------------------------------------------------------
def test_sft_loss_ignores_user_and_system_tokens(builtin_tokenizer):
    """The loss is the sum of -log p over the assistant's tokens (and their closing <|end|>) only:
    replacing every non-assistant target with another token leaves it unchanged."""
    import numpy as np

    from model.config import preset
    from model.llama import Transformer
    from model.scoring import token_logprobs
    from pipelines.sft import SFTTask
    from pipelines.train.conversations import encode_conversation, pad_batch

    torch.manual_seed(0)
    model = Transformer(preset("1m", vocab_size=builtin_tokenizer.vocab_size))
    conversation = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "What does json.dumps do?"},
                    {"role": "assistant", "content": "Serialize an object to a JSON string."},
                    {"role": "user", "content": "And json.loads?"},
                    {"role": "assistant", "content": "Deserialize a string."}]
    ids, mask = encode_conversation(builtin_tokenizer, conversation, 128)
    batch = pad_batch([(np.array(ids), np.array(mask))])
    assert batch.count == sum(mask) and sum(mask) < len(ids) / 2
    loss = SFTTask._loss_sum(None, model, batch, torch.device("cpu"))
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))
    all_targets = torch.tensor([ids[1:]])
    picked = token_logprobs(logits, all_targets)[0]
    trained = torch.tensor(mask[1:])
    assert float(loss) == pytest.approx(float(-picked[trained].sum()), rel=1e-5)
    # Any other token as the target of a user or system position: the same loss.
    shuffled = all_targets.clone()
    shuffled[0, ~trained] = (shuffled[0, ~trained] + 11) % builtin_tokenizer.vocab_size
    other = token_logprobs(logits, shuffled)[0]
    assert float(-other[trained].sum()) == pytest.approx(float(loss), rel=1e-5)
    assert not torch.allclose(other[~trained], picked[~trained])


def test_sft_lowers_held_out_assistant_loss(sft_run):
    run, manifest = sft_run
    figures = manifest["figures"]
    assert figures["val_loss"] < figures["start_val_loss"] - 0.5, figures
    assert (run / "sft" / "model" / "model.safetensors").is_file()
    assert manifest["counts"]["validation_examples"] > 100 and manifest["counts"]["train_examples"] > 1000
    from model.checkpoint import load_model

    load_model(run / "sft" / "model")  # servable as a language model


def test_sft_zero3_with_uneven_validation_matches_zero0_and_resume_continues(sft_run, tmp_path):
    """The shared SFT run (ZeRO-0) again under ZeRO-3 with a validation set that gives the two ranks
    different numbers of batches (5 rows, micro-batches of 2: rank 0 two, rank 1 one), stopped after step 2
    as if preempted, then resumed to step 4: the same losses."""
    from pipelines import sft

    run, _ = sft_run
    reference = _train_losses(run, "sft")
    again = tmp_path / "z3"
    (again / "pretrain").mkdir(parents=True)
    (again / "pretrain" / "model").symlink_to(run / "pretrain" / "model")
    settings = (*SFT_SETTINGS, "train.zero.stage=3", "train.eval.max_rows=5", "train.eval.every_steps=2",
                "train.batch.micro_batch_size=2", "train.checkpoint.every_steps=2")
    first = sft.run(_build(sft, again, *settings, "train.stop_at_step=2"))
    assert first["figures"]["val_loss"] > 0 and first["counts"]["steps"] == 2
    sft.run(_build(sft, again, *settings, "train.stop_at_step=4", "resume=true"))
    losses = _train_losses(again, "sft")
    assert sorted(losses) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert losses[step] == pytest.approx(reference[step], abs=2e-4), step


def test_bad_rows_are_counted_set_aside_and_masked(base_run, tmp_path):
    from pipelines import sft

    good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]}
    rows = [json.dumps(good)] * 40 + [
        json.dumps({"text": "not a conversation"}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "mail me at jane.doe@example.com"}]}),
        json.dumps({"prompt": "long?", "completion": "word " * 400}),
        "{not json",
    ]
    data = tmp_path / "chats.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())  # a byte-order mark must not cost the first row
    run = tmp_path / "run"
    _, _, examples, _, (n_train, n_validation) = sft.prepare(_build(
        sft, run, f"from={base_run / 'pretrain' / 'model'}", f"data=[{data}]", "validation_share=0.0",
        f"validation=[{data}]", "train.batch.global_batch_sequences=8"))
    assert dict(examples.rejects.counts) == {"not_a_conversation": 2, "unknown_role": 2, "no_assistant_turn": 2,
                                             "too_long": 2, "malformed_json": 2}  # once as data, once as validation
    assert n_train == 40 and n_validation == 40
    rejects = (run / "sft" / "rejects.jsonl").read_text()
    assert "jane.doe@example.com" not in rejects and "no_assistant_turn" in rejects


def test_cli_errors_are_one_line_with_exit_2(tmp_path, sft_run):
    run, _ = sft_run
    cases = [
        (["sft", "--run", str(tmp_path / "empty")], "groundup pretrain"),
        (["reward", "--run", str(run), "--pairs", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["dpo", "--run", str(run), "--from", str(tmp_path)], "from"),
        (["sft", "--run", str(run), "train.optimizer.lr=-1"], "train.optimizer.lr"),
    ]
    _assert_one_line_errors(cases)


# ---- LoRA -------------------------------------------------------------------------------------------
def test_lora_trains_only_adapters_and_merges_into_base_plus_ba():
    from model.config import preset
    from model.llama import Transformer
    from model.lora import add_lora, merged, trainable_parameters

    torch.manual_seed(0)
    base = Transformer(preset("1m", vocab_size=512))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = add_lora(base, rank=4, alpha=8.0, dropout=0.0, targets=["wq", "w2"])
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert trainable_parameters(adapted) == sum(4 * (layer.attention.wq.in_features + layer.attention.wq.out_features)
                                                + 4 * (layer.mlp.w2.in_features + layer.mlp.w2.out_features)
                                                for layer in base.layers)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, 0, 0.05)
    tokens = torch.randint(0, 512, (2, 12))
    expected = adapted(tokens)
    layer = adapted.model.layers[0].attention.wq
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (8.0 / 4)
    plain = merged(adapted)
    assert torch.allclose(plain(tokens), expected, atol=1e-5)
    assert torch.allclose(plain.layers[0].attention.wq.weight, before["layers.0.attention.wq.weight"] + delta, atol=1e-6)
    assert torch.equal(plain.layers[0].attention.wk.weight, before["layers.0.attention.wk.weight"])


# ---- reward model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_run(sft_run):
    from pipelines import reward

    run, _ = sft_run
    return run, reward.run(_build(reward, run, *REWARD_SETTINGS))


def test_reward_model_learns_the_rule_on_held_out_pairs(reward_run):
    run, manifest = reward_run
    figures = manifest["figures"]
    assert figures["val_accuracy"] >= 0.9, figures
    assert figures["start_val_accuracy"] < 0.75, figures
    from model.checkpoint import CheckpointError, load_model, load_tokenizer
    from model.reward import load_reward_model, reward_stats, score

    directory = run / "reward" / "model"
    stats = reward_stats(directory)
    assert stats["std"] == pytest.approx(figures["val_reward_std"]) and stats["std"] > 0
    model, tokenizer = load_reward_model(directory), load_tokenizer(directory)
    from pipelines.data.instructions import builtin_preference_pairs

    pairs = builtin_preference_pairs("validation")[:40]
    chosen = score(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 0.85 * len(pairs)
    with pytest.raises(CheckpointError, match="reward model"):
        load_model(directory)  # it scores; it cannot be served as a language model


def test_reward_zero3_matches_zero0(reward_run, tmp_path):
    """The shared reward run (ZeRO-0) again under ZeRO-3, stopped after step 2: the same first losses."""
    from pipelines import reward

    run, _ = reward_run
    again = tmp_path / "z3"
    (again / "sft").mkdir(parents=True)
    (again / "sft" / "model").symlink_to(run / "sft" / "model")
    reward.run(_build(reward, again, *REWARD_SETTINGS, "train.zero.stage=3", "train.stop_at_step=2",
                      "train.eval.max_rows=5", "train.checkpoint.every_steps=2"))
    reference, losses = _train_losses(run, "reward"), _train_losses(again, "reward")
    for step in (1, 2):
        assert losses[step] == pytest.approx(reference[step], abs=2e-4), step


# ---- DPO --------------------------------------------------------------------------------------------
def test_dpo_under_zero3_raises_the_held_out_margin(sft_run):
    """ZeRO-3: the policy and the frozen reference are both sharded DeepSpeed engines (the reference came
    back as None before: DeepSpeedEngine.eval() returns None), and DPO still learns."""
    from pipelines import dpo

    run, _ = sft_run
    manifest = dpo.run(_build(dpo, run, "train.num_workers=2", "train.zero.stage=3", "train.length.steps=30",
                              "train.batch.micro_batch_size=8", "train.batch.global_batch_sequences=32",
                              "train.optimizer.lr=1e-3", "train.eval.every_steps=30", "train.eval.max_rows=200",
                              "train.precision.dtype=fp32", "beta=0.1"))
    figures = manifest["figures"]
    assert figures["start_val_rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert figures["val_rewards/margins"] > 0.5, figures
    assert figures["val_rewards/accuracies"] >= 0.8, figures
    from model.checkpoint import load_model

    load_model(run / "dpo" / "model")


# ---- PPO --------------------------------------------------------------------------------------------
# Tiny iterations: 8 prompts over 2 workers, 2 mini-batches of micro-batches of 2, short replies.
PPO_COMMON = ("train.num_workers=2", "train.precision.dtype=fp32", "train.batch.micro_batch_size=2",
              "train.log_every=1", "train.checkpoint.every_steps=1", "algo.prompts_per_iteration=8",
              "rollout.max_new_tokens=12", "train.eval.max_rows=16", "train.optimizer.lr=2e-4")


def _ppo_records(run: Path) -> list[dict]:
    from pipelines.train.metrics import read_metrics

    return read_metrics(run / "ppo" / "metrics.jsonl")


def test_ppo_zero2_matches_zero0_resume_and_a_killed_worker_continue_exactly(reward_run, tmp_path):
    from pipelines import ppo

    run, _ = reward_run
    common = (*PPO_COMMON, f"from={run / 'sft' / 'model'}", f"reward.model={run / 'reward' / 'model'}",
              "kl.adaptive=true", "kl.target=0.5", "kl.horizon=50", "train.eval.every_steps=100",
              "train.length.steps=2")
    # Reference: 2 iterations on ZeRO-0, rank 1 killed at iteration 2 and restored from iteration 1.
    ppo.run(_build(ppo, tmp_path / "z0", *common, "train.zero.stage=0", "train.fault.crash_at_step=2",
                   "train.fault.crash_rank=1"))
    reference = {r["step"]: r for r in _ppo_records(tmp_path / "z0") if r["kind"] == "train"}
    assert sorted(reference) == [1, 2]
    assert (tmp_path / "z0" / "ppo" / "fault-injected-step2-rank1").exists()
    # ZeRO-2, stopped after iteration 1 and resumed: the same iterations, KL controller included.
    resumed = tmp_path / "z2"
    ppo.run(_build(ppo, resumed, *common, "train.zero.stage=2", "train.stop_at_step=1"))
    ppo.run(_build(ppo, resumed, *common, "train.zero.stage=2", "resume=true"))
    again = {r["step"]: r for r in _ppo_records(resumed) if r["kind"] == "train"}
    for step in (1, 2):
        for key in ("loss/policy_avg", "objective/scores", "kl_coef"):
            assert again[step][key] == pytest.approx(reference[step][key], abs=2e-4), (step, key)
    assert reference[2]["kl_coef"] != reference[1]["kl_coef"]  # the adaptive controller moved


def test_grpo_with_the_rule_alone_raises_the_held_out_rule_score_by_half_within_5_nats(sft_run, tmp_path):
    """No reward model and no critic: GRPO's group baseline over 4 replies per prompt, rewarded by the
    built-in rule as functions (the rule itself plus its dense form, the share of its parts met). On 256
    questions about modules never seen in training, the share of replies that follow the rule rises by at
    least half of the SFT model's, while the mean KL to the SFT model stays within 5 nats per reply."""
    from pipelines import ppo

    run, _ = sft_run
    manifest = ppo.run(_build(ppo, tmp_path, *PPO_COMMON, f"from={run / 'sft' / 'model'}", "reward.model=null",
                              "reward.function=[pipelines.data.instructions:rule_reward,"
                              "pipelines.data.instructions:rule_fraction_reward]",
                              "algo.estimator=grpo", "algo.group_size=4", "algo.prompts_per_iteration=8",
                              "rollout.max_new_tokens=24", "rollout.temperature=0.7", "kl.coef=0.05",
                              "train.length.steps=16", "train.eval.every_steps=16", "train.eval.max_rows=256",
                              "train.optimizer.lr=5e-4", "train.log_every=4", "train.checkpoint.every_steps=16"))
    figures = manifest["figures"]
    assert manifest["inputs"]["reward_model"] is None
    before, after = figures["start_val_rule_score"], figures["val_rule_score"]
    assert after >= 1.5 * before and after >= before + 0.02, figures
    assert figures["val_kl"] <= 5.0, figures
    assert figures["val_score"] > figures["start_val_score"], figures
    assert not list((tmp_path / "ppo" / "ray").glob("**/ds-critic"))  # no critic was trained


def test_ppo_config_errors_name_the_field(sft_run, tmp_path):
    run, _ = sft_run
    cases = [
        (["ppo", "--run", str(tmp_path / "empty")], "groundup sft"),
        (["ppo", "--run", str(run), "--estimator", "grpo"], "algo.group_size"),
        (["ppo", "--run", str(run), "reward.model=null"], "reward"),
        (["ppo", "--run", str(run), "reward.model=null", "--reward-function", "nowhere:fn"], "reward.function"),
    ]
    _assert_one_line_errors(cases)


# ---- the human-feedback loop, closed ----------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(models: list[str]) -> str:
    """`groundup serve --model NAME=PATH ...`'s deployment (API only) on the session cluster; its /v1 URL."""
    from serving.app import Config, deploy
    from tests.conftest import _wait_healthy

    urls = deploy(Config(models=models, port=_free_port(), num_cpus=0.5, max_batch_size=16, default_max_tokens=24,
                         ui=False, block=False))
    _wait_healthy(urls["health"])
    return urls["api"]


def _cli(*argv: str, timeout: int = 900) -> None:
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], check=False, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-3000:])


def test_the_feedback_loop_ranks_ppo_above_sft(sft_run, tmp_path):
    """serve SFT → a scripted rater votes in the app's Compare flow (by the built-in rule) → `groundup prefs
    export` → `groundup reward` (on those votes only) → `groundup ppo` (GAE, critic and reward from the
    reward model) → serve sft and ppo → the same rater votes on questions about modules never seen in
    training → the leaderboard ranks ppo above sft. PPO's held-out reward rises with KL ≤ 5 nats/reply."""
    import asyncio

    from ray import serve

    from ui.ratings import compute_ratings
    from ui.scripted_rater import builtin_questions, rate_rounds
    from ui.store import PreferenceStore

    run, _ = sft_run
    loop = tmp_path / "loop"
    (loop / "sft").mkdir(parents=True)
    (loop / "sft" / "model").symlink_to(run / "sft" / "model")
    store = PreferenceStore(str(tmp_path / "votes.db"))
    try:
        rated = asyncio.run(rate_rounds(_serve([f"sft={loop / 'sft' / 'model'}"]), store,
                                        builtin_questions("train", 64), seed=1, n_answers=4))
    finally:
        serve.shutdown()  # its CPUs go back to the training runs below
    assert rated.failed == 0 and rated.votes == 64 and rated.ties < 64, rated
    _cli("prefs", "export", "--run", str(loop), "--database", str(tmp_path / "votes.db"))
    # One worker each: the 2-worker paths of these stages are tested above; here the loop is the point.
    _cli("reward", "--run", str(loop), "train.num_workers=1", "train.precision.dtype=fp32", "train.length.steps=30",
         "train.batch.micro_batch_size=8", "train.batch.global_batch_sequences=16", "train.optimizer.lr=1e-3",
         "train.eval.every_steps=30")
    reward_manifest = json.loads((loop / "reward" / "manifest.json").read_text())
    assert reward_manifest["inputs"]["pairs"][0].endswith("prefs/train.jsonl")  # the votes, not built-in pairs
    _cli("ppo", "--run", str(loop), *PPO_COMMON, "train.num_workers=1", "train.length.steps=12", "train.eval.every_steps=12",
         "train.eval.max_rows=32", "algo.prompts_per_iteration=16", "rollout.max_new_tokens=24", "kl.coef=0.05",
         "train.optimizer.lr=3e-4")
    manifest = json.loads((loop / "ppo" / "manifest.json").read_text())
    figures = manifest["figures"]
    assert figures["val_score"] > figures["start_val_score"] + 0.1, figures
    assert figures["val_kl"] <= 5.0, figures
    train = [r for r in _ppo_records(loop) if r["kind"] == "train"]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    assert mean(train[-3:], "objective/rlhf_reward") > mean(train[:3], "objective/rlhf_reward")
    for name in ("objective/kl", "objective/entropy", "objective/scores", "objective/non_score_reward",
                 "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                 "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "lr", "time/rollout", "time/update"):
        assert name in train[-1], name
    assert (loop / "ppo" / "rewards.png").is_file()
    assert len(manifest["outputs"]["replies"]) == 5 and {"sft", "ppo"} <= set(manifest["outputs"]["replies"][0])

    try:
        api = _serve([f"sft={loop / 'sft' / 'model'}", f"ppo={loop / 'ppo' / 'model'}"])
        judged = asyncio.run(rate_rounds(api, store, builtin_questions("validation", 48), seed=2, n_answers=4))
    finally:
        serve.shutdown()
    assert judged.failed == 0, judged
    board = {r.model: r for r in compute_ratings(store.votes(), bootstrap=0)}
    assert set(board) == {"sft", "ppo"}  # the first round's sft-vs-sft votes rate nobody
    assert board["ppo"].rating > board["sft"].rating, board
    assert board["ppo"].win_rate > 0.5, board
