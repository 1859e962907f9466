"""Generate the DeepSpeed config dict from the typed config and the resolved plan.

The optimizer and scheduler are deliberately absent: we hand DeepSpeed a torch AdamW object and a
LambdaLR factory. Naming "AdamW" here makes DeepSpeed JIT-compile its fused Adam (~45 s) on every start.
"""
from __future__ import annotations

from typing import Any

from pipelines.train.config import TrainConfig
from pipelines.train.plan import TrainPlan


def deepspeed_config(config: TrainConfig, plan: TrainPlan, steps_per_print: int | None = None) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": config.zero.stage}
    if config.zero.stage >= 1 and config.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if config.zero.stage == 3:
        # Export needs whole weights: gather the 16-bit shards on save instead of failing.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch_sequences,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": zero,
        # A torch optimizer object under ZeRO: DeepSpeed only checks it is one of its own unless told.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": steps_per_print or 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }
    if plan.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif plan.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if config.activation_checkpointing:
        # The model checkpoints its own blocks (Transformer.activation_checkpointing); this records
        # the choice in the config DeepSpeed logs, with no partitioning of activations.
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return ds
