"""Unit tests of the training core without Ray: DeepSpeed config generation, plans, schedules, the
seeded data order, RNG state round trips and the unigram baseline."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pipelines.config import ConfigError, build_config
from pipelines.train.checkpoint import rng_states, set_rng_states
from pipelines.train.config import TrainConfig
from pipelines.train.data import BatchOrder, PackedShards, bits_per_byte, unigram_bits_per_byte
from pipelines.train.deepspeed_config import deepspeed_config
from pipelines.train.plan import make_plan, resolve_precision
from pipelines.train.schedule import make_schedule


def _plan(config: TrainConfig, seq: int = 64, precision: str = "bf16"):
    return make_plan(config, seq, flops_per_token=6e6, num_parameters=1_000_000, precision=precision)


def test_deepspeed_config_reaches_global_batch_with_accumulation():
    config = TrainConfig(num_workers=2, batch={"micro_batch_size": 4, "global_batch_tokens": 4096},
                         zero={"stage": 2}, optimizer={"grad_clip": 0.5})
    plan = _plan(config)
    ds = deepspeed_config(config, plan)
    assert ds["train_batch_size"] == 64 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    # The optimizer and scheduler are torch objects handed to deepspeed.initialize, never named here.
    assert "optimizer" not in ds and "scheduler" not in ds
    assert plan.tokens_per_step == 4096


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_zero_stages_and_precisions(stage):
    config = TrainConfig(zero={"stage": stage, "offload_optimizer": stage > 0}, activation_checkpointing=True)
    for precision in ("bf16", "fp16", "fp32"):
        ds = deepspeed_config(config, _plan(config, precision=precision))
        assert ds["zero_optimization"]["stage"] == stage
        assert ("offload_optimizer" in ds["zero_optimization"]) == (stage > 0)
        assert ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
        assert ("bf16" in ds) == (precision == "bf16") and ("fp16" in ds) == (precision == "fp16")
        assert "activation_checkpointing" in ds


def test_precision_resolution():
    assert resolve_precision("auto", has_gpu=False, gpu_bf16=False) == "bf16"
    assert resolve_precision("auto", has_gpu=True, gpu_bf16=False) == "fp16"
    assert resolve_precision("auto", has_gpu=True, gpu_bf16=True) == "bf16"
    assert resolve_precision("fp32", has_gpu=False, gpu_bf16=False) == "fp32"
    with pytest.raises(ConfigError):
        resolve_precision("fp16", has_gpu=False, gpu_bf16=False)


def test_length_in_steps_tokens_flops_and_tokens_per_parameter_agree():
    base = {"num_workers": 1, "batch": {"micro_batch_size": 8, "global_batch_tokens": 1024}}
    tokens_per_step = 8 * 128
    by_steps = _plan(TrainConfig(**base, length={"steps": 50}), seq=128)
    by_tokens = _plan(TrainConfig(**base, length={"tokens": 50 * tokens_per_step}), seq=128)
    by_flops = _plan(TrainConfig(**base, length={"flops": 50 * tokens_per_step * 6e6}), seq=128)
    by_ratio = _plan(TrainConfig(**base, length={"tokens_per_parameter": 50 * tokens_per_step / 1e6}), seq=128)
    assert {p.total_steps for p in (by_steps, by_tokens, by_flops, by_ratio)} == {50}
    assert by_flops.total_flops == pytest.approx(50 * tokens_per_step * 6e6)
    assert "50 steps" in by_steps.describe()


def test_bad_train_config_is_one_line_error():
    from pipelines.pretrain import Config

    with pytest.raises(ConfigError) as err:
        build_config(Config, overrides=["train.zero.stage=4"])
    assert "train.zero.stage" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="train.length"):
        build_config(Config, overrides=["train.length={}"])


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_then_decay_to_min(kind):
    schedule = make_schedule(TrainConfig(schedule={"kind": kind, "warmup_steps": 10, "min_lr_ratio": 0.1,
                                                   "decay_fraction": 0.2}).schedule, total_steps=100)
    factors = [schedule(s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(factors[:10], factors[1:10]))
    if kind == "constant":
        assert factors[-1] == 1.0
        return
    assert factors[-1] == pytest.approx(0.1, abs=0.02)
    assert all(b <= a + 1e-12 for a, b in zip(factors[10:], factors[11:]))
    if kind == "wsd":
        assert factors[79] == 1.0 and factors[80] < 1.0  # stable until the last 20% of steps


def test_batch_order_is_seeded_partitioned_and_covers_each_epoch():
    order = BatchOrder(num_rows=100, global_batch=8, seed=3)
    assert np.array_equal(order.step_rows(5), BatchOrder(100, 8, 3).step_rows(5))
    assert not np.array_equal(order.step_rows(5), BatchOrder(100, 8, 4).step_rows(5))
    epoch = np.concatenate([order.step_rows(s) for s in range(order.steps_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch) == 96
    # Two workers' micro-batches of a step partition that step's global batch.
    parts = [r for rank in (0, 1) for r in order.micro_batches(7, rank, world=2, micro=2)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(order.step_rows(7).tolist())
    assert order.position(25) == {"step": 25, "epoch": 2, "offset": 1}


def test_packed_shards_read_rows_across_shards(tmp_path):
    a = np.arange(3 * 9, dtype=np.uint16).reshape(3, 9)
    b = 1000 + np.arange(2 * 9, dtype=np.uint16).reshape(2, 9)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    shards = PackedShards([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")], [3, 2], sequence_length=4)
    rows = shards.rows(np.array([4, 0, 3]))
    assert rows.dtype == torch.int64 and rows.shape == (3, 5)
    assert rows[0].tolist() == b[1, :5].tolist() and rows[1].tolist() == a[0, :5].tolist()
    assert rows[2].tolist() == b[0, :5].tolist()


def test_unigram_bits_per_byte_of_uniform_tokens(tmp_path):
    rows = np.tile(np.arange(4, dtype=np.uint16), (8, 3))[:, :9]  # every row 0,1,2,3,0,1,...
    np.save(tmp_path / "s.npy", rows)
    shards = PackedShards([str(tmp_path / "s.npy")], [8], sequence_length=8)
    tokens = rows[:, 1:].size
    assert unigram_bits_per_byte(shards, num_bytes=tokens * 2, vocab_size=16) == pytest.approx(2.0 / 2)
    assert bits_per_byte(math.log(2), tokens=10, num_bytes=5) == pytest.approx(2.0)


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_states(saved)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
