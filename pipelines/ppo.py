"""``groundup ppo``: reinforcement learning from a reward model and/or reward functions, a Task of the one
training core whose step is a whole PPO iteration.

Four models per Ray Train worker: the **actor** (from ``<run>/sft/model``) and the **critic** (from
``<run>/reward/model``: the same network, its head read at every position as a value) are DeepSpeed
engines with their own optimizers; the **reference** (the SFT weights) and the **reward model** are
frozen. Rollouts run inside the training workers with the one generation core (``model.generate``):
under ZeRO-3 every rank keeps running forward passes until all ranks are done (``synced``), so no
rank waits on a collective another never joins, and there are no weights to ship to separate actors.

One iteration: each worker takes its share of the prompts (seeded by iteration, so resume continues
exactly), samples replies, scores them (reward model normalised with its stored mean/std and clipped,
plus weighted reward functions, minus a penalty for replies that never close their turn), adds a
per-token KL penalty to the reference (k1 or k3, fixed or adaptive coefficient), computes advantages
(GAE with the critic, or group baselines: GRPO / RLOO), then runs several epochs of mini-batches with
the clipped policy loss and the clipped value loss. Metrics carry TRL's names.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from pipelines.cli import Flag, stage_main
from pipelines.config import ConfigError, StrictModel
from pipelines.posttrain import (
    ModelSource,
    PostTrainConfig,
    add_reply_comparison,
    common_flags,
    load_examples,
    loop_spec,
    resolve_model,
)
from pipelines.rundir import RunDir
from pipelines.train.conversations import RowError, _messages
from pipelines.train.data import BatchOrder
from pipelines.train.task import Figures, StepContext, StepResult, TaskDefaults, TaskLoss

STAGE = "ppo"


class AlgoConfig(StrictModel):
    estimator: Literal["gae", "grpo", "rloo"] = Field("gae", description="gae: critic + GAE; grpo/rloo: group "
                                                      "baselines over group_size samples per prompt, no critic")
    group_size: int = Field(1, ge=1, description="replies sampled per prompt (>= 2 for grpo/rloo)")
    prompts_per_iteration: int = Field(32, ge=1, description="prompts per iteration, all workers together")
    ppo_epochs: int = Field(2, ge=1)
    num_minibatches: int = Field(2, ge=1, description="optimizer steps per epoch")
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    critic_lr_scale: float = Field(1.0, gt=0, description="critic learning rate / the actor's")


class KLConfig(StrictModel):
    estimator: Literal["k1", "k3"] = Field("k1", description="k1: log π - log π_ref; k3: (r - 1) - log r")
    coef: float = Field(0.05, ge=0, description="initial KL penalty coefficient β")
    adaptive: bool = Field(False, description="adapt β towards target (Ziegler et al.)")
    target: float = Field(4.0, gt=0, description="adaptive: KL per reply to aim for (nats)")
    horizon: int = Field(10000, ge=1, description="adaptive: reaction time in replies")


class RolloutConfig(StrictModel):
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


class RewardSettings(StrictModel):
    model: str | None = Field("auto", description="reward model directory; auto: <run>/reward/model when it "
                              "exists; null: none (reward functions only)")
    model_weight: float = Field(1.0, ge=0)
    function: list[str] = Field(default_factory=list, description="reward functions module:callable, "
                                "fn(prompts, replies) -> list[float]")
    function_weights: list[float] = Field(default_factory=list, description="one per function (default 1)")
    clip: float = Field(5.0, gt=0, description="clip the normalised reward-model score to ±clip")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted when a reply never closes its turn")


class Config(PostTrainConfig):
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {
        "optimizer": {"lr": 1e-5}, "schedule": {"kind": "constant", "warmup_steps": 0}, "length": {"steps": 50},
        "batch": {"micro_batch_size": 8}, "eval": {"every_steps": 10, "max_rows": 64}}
    prompts: list[str] = Field(default_factory=list, description="prompt files (default: built-in questions)")
    algo: AlgoConfig = AlgoConfig()
    kl: KLConfig = KLConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardSettings = RewardSettings()


CLI_FLAGS = (
    *[f for f in common_flags("--data", "") if f.dest != "data"],
    Flag(("--prompts",), "prompts", "prompts: JSONL/Parquet rows {prompt} or {messages} (repeatable)",
         {"action": "append"}),
    Flag(("--reward-function",), "reward.function", "reward function module:callable (repeatable)",
         {"action": "append"}),
    Flag(("--estimator",), "algo.estimator", "gae, grpo or rloo", {"choices": ["gae", "grpo", "rloo"]}),
)


def parse_prompt(row: Any) -> list[dict]:
    """A prompt row: ``{"prompt": str | messages}`` or ``{"messages": [...]}`` ending with a user turn."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
        raise RowError("not_a_prompt", "expected 'prompt' or 'messages'")
    messages = _messages(row.get("prompt", row.get("messages")), "prompt", "user")
    if messages[-1]["role"] != "user":
        raise RowError("not_a_prompt", "a prompt must end with a user message")
    return messages


def load_function(spec: str) -> Callable:
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"config field 'reward.function': cannot load {spec!r} ({err})") from None
    if not callable(function):
        raise ConfigError(f"config field 'reward.function': {spec!r} is not callable")
    return function


@dataclass
class Rollout:
    """One iteration's experience on this worker, padded [rows, time]."""

    tokens: torch.Tensor
    response_mask: torch.Tensor  # [rows, time - 1]: True where logits[t] predict a sampled token
    old_logprobs: torch.Tensor  # [rows, time - 1]
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None
    figures: Figures


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    log_ratio = logprobs - ref_logprobs
    if estimator == "k3":  # unbiased, always >= 0 (Schulman's k3)
        return torch.expm1(-log_ratio) + log_ratio
    return log_ratio


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over each row's response tokens (right-aligned mask)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros_like(last)
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m + last * (1 - m)
        advantages[:, t] = last * m
        next_value = values[:, t] * m + next_value * (1 - m)
    return advantages, advantages + values


def group_advantages(totals: torch.Tensor, group: int, estimator: str) -> torch.Tensor:
    grouped = totals.view(-1, group)
    if estimator == "rloo":
        baseline = (grouped.sum(1, keepdim=True) - grouped) / max(group - 1, 1)
        return (grouped - baseline).reshape(-1)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


@dataclass
class PPOTask(TaskDefaults):
    actor: ModelSource
    critic: ModelSource | None  # None for grpo/rloo
    reward_model: ModelSource | None
    reward_stats: dict[str, float]
    train_prompts: list[list[dict]]
    validation_prompts: list[list[dict]]
    order: BatchOrder
    algo: AlgoConfig
    kl: KLConfig
    rollout: RolloutConfig
    reward: RewardSettings
    micro_batch_size: int
    eval_max_rows: int
    seed: int
    name: str = STAGE
    progress_figures: tuple[str, ...] = ("objective/scores", "objective/kl", "objective/rule_score")
    kl_coef: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.kl_coef = self.kl.coef

    # ---- models ----
    def build_model(self) -> torch.nn.Module:
        return self.actor.load_language_model()

    def build_trained(self) -> dict[str, tuple[torch.nn.Module, float]]:
        if self.critic is None:
            return {}
        from model.reward import RewardModel, load_reward_model

        critic = load_reward_model(self.critic.path) if self.critic.kind == "reward" else \
            RewardModel.from_language_model(self.critic.load_language_model())
        return {"critic": (critic, self.algo.critic_lr_scale)}

    def build_frozen(self) -> dict[str, torch.nn.Module]:
        frozen = {"reference": self.actor.load_language_model()}
        if self.reward_model is not None:
            from model.reward import load_reward_model

            frozen["reward"] = load_reward_model(self.reward_model.path)
        return frozen

    def state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef}

    def restore(self, state: dict[str, Any]) -> None:
        self.kl_coef = float(state["kl_coef"])

    # ---- rollouts ----
    def _tokenizer(self):
        if not hasattr(self, "_tok"):
            self._tok = self.actor.load_tokenizer()
        return self._tok

    def _functions(self) -> list[tuple[Callable, float]]:
        weights = self.reward.function_weights or [1.0] * len(self.reward.function)
        return [(load_function(spec), w) for spec, w in zip(self.reward.function, weights)]

    def _sample(self, ctx: StepContext, prompts: list[list[dict]], seeds: list[int]):
        from model.generate import SamplingParams, generate

        tokenizer = self._tokenizer()
        encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True).ids for p in prompts]
        params = [SamplingParams(max_new_tokens=self.rollout.max_new_tokens, temperature=self.rollout.temperature,
                                 top_p=self.rollout.top_p, seed=seed) for seed in seeds]
        # Below ZeRO-3 the weights are whole on every rank: sample from the bare module, skipping the DeepSpeed
        # engine's per-call forward wrapper, which costs more than a decode step of a small model. Under
        # ZeRO-3 the engine gathers the shards and every rank steps in sync.
        synced = ctx.zero_stage == 3
        model = ctx.model if synced else getattr(ctx.model, "module", ctx.model)
        completions = generate(model, encoded, params, tokenizer, synced=synced)
        return encoded, completions

    def _scores(self, ctx: StepContext, prompts, encoded, completions) -> tuple[torch.Tensor, torch.Tensor]:
        """(score per reply, rule score per reply)."""
        from model.reward import last_token_scores
        from pipelines.data.instructions import rule_score

        tokenizer = self._tokenizer()
        texts = [c.text.strip() for c in completions]
        scores = torch.zeros(len(texts), dtype=torch.float32)
        if self.reward_model is not None and self.reward.model_weight:
            closed = [p + c.token_ids + [tokenizer.end_of_turn_id] for p, c in zip(encoded, completions)]
            batch, lengths = _pad(closed)
            with torch.no_grad():
                raw = last_token_scores(ctx.frozen["reward"](batch.to(ctx.device)), lengths).float().cpu()
            normalised = (raw - self.reward_stats["mean"]) / max(self.reward_stats["std"], 1e-6)
            scores += self.reward.model_weight * normalised.clamp(-self.reward.clip, self.reward.clip)
        for function, weight in self._functions():
            values = function(prompts, texts)
            scores += weight * torch.tensor([float(v) for v in values], dtype=torch.float32)
        unfinished = torch.tensor([c.finish_reason != "stop" for c in completions])
        scores -= self.reward.missing_eos_penalty * unfinished.float()
        return scores, torch.tensor([rule_score(t) for t in texts], dtype=torch.float32)

    def _experience(self, ctx: StepContext, step: int) -> Rollout:
        group = self.algo.group_size
        mine = self.order.micro_batches(step, ctx.rank, ctx.world, self.order.global_batch // ctx.world)[0]
        prompts = [self.train_prompts[int(i)] for i in mine for _ in range(group)]
        seeds = [hash((self.seed, step, int(i), k)) % 2**62 for i in mine for k in range(group)]
        started = time.perf_counter()
        encoded, completions = self._sample(ctx, prompts, seeds)
        generate_s = time.perf_counter() - started
        scores, rules = self._scores(ctx, prompts, encoded, completions)
        sequences = [p + c.sampled_ids for p, c in zip(encoded, completions)]
        tokens, _ = _pad(sequences)
        response = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
        for row, (p, c) in enumerate(zip(encoded, completions)):
            response[row, len(p) - 1:len(p) - 1 + len(c.sampled_ids)] = True
        with torch.no_grad():
            old = _logprobs(ctx.model, tokens, ctx.device)
            ref = _logprobs(ctx.frozen["reference"], tokens, ctx.device)
            values = None
            if "critic" in ctx.trained:
                values = ctx.trained["critic"](tokens.to(ctx.device)).float().cpu()[:, :-1]
        kl = kl_per_token(old, ref, self.kl.estimator) * response
        kl_sum = kl.sum(1)
        non_score = -self.kl_coef * kl_sum
        mask = response.float()
        if values is not None:
            rewards = -self.kl_coef * kl
            last = response.long().cumsum(1).argmax(1)  # each row's last response position
            rewards[torch.arange(len(rewards)), last] += scores
            advantages, returns = gae(rewards, values * mask, mask, self.algo.gamma, self.algo.lam)
        else:
            per_reply = group_advantages(scores + non_score, group, self.algo.estimator)
            advantages, returns = per_reply[:, None] * mask, None
        if self.algo.whiten_advantages:
            advantages = whiten(advantages, mask)
        n = len(completions)
        entropy = -(old * response).sum(1)
        eos = sum(c.finish_reason == "stop" for c in completions)
        figures = {"objective/kl": (float(kl_sum.sum()), n), "objective/entropy": (float(entropy.sum()), n),
                   "objective/scores": (float(scores.sum()), n), "objective/non_score_reward": (float(non_score.sum()), n),
                   "objective/rlhf_reward": (float((scores + non_score).sum()), n),
                   "objective/rule_score": (float(rules.sum()), n), "val/num_eos_tokens": (float(eos), 1),
                   "reply_tokens": (float(response.sum()), n),
                   # generated tokens per second of generation, per worker (the rollout's sampling speed)
                   "time/generate_tokens_per_s": (float(response.sum()) / max(generate_s, 1e-9), 1)}
        return Rollout(tokens, response, old, ref, values, advantages, returns, figures)

    # ---- one iteration ----
    def train_step(self, ctx: StepContext, step: int) -> StepResult:
        from pipelines.train.loop import all_reduce_sum, reduce_figures

        started = time.perf_counter()
        experience = self._experience(ctx, step)
        rollout_s = time.perf_counter() - started
        rows = experience.tokens.shape[0]
        per_minibatch = rows // self.algo.num_minibatches
        micro = self.micro_batch_size
        figures: Figures = dict(experience.figures)
        rng = np.random.default_rng([self.seed, step, ctx.rank])
        for _ in range(self.algo.ppo_epochs):
            order = rng.permutation(rows)
            for start in range(0, per_minibatch * self.algo.num_minibatches, micro):
                chunk = torch.from_numpy(order[start:start + micro])
                self._update(ctx, experience, chunk, figures)
        update_s = time.perf_counter() - started - rollout_s
        means = reduce_figures(figures, ctx.device)
        # Adaptive KL (Ziegler et al. 2019): the same on every rank (the mean KL is all-reduced).
        if self.kl.adaptive:
            error = float(np.clip(means["objective/kl"] / self.kl.target - 1, -0.2, 0.2))
            replies = rows * ctx.world
            self.kl_coef *= 1 + error * replies / self.kl.horizon
        tokens = int(all_reduce_sum(torch.tensor([float(experience.tokens.numel())], dtype=torch.float64,
                                                 device=ctx.device))[0])
        means.update({"time/rollout": rollout_s, "time/update": update_s, "kl_coef": self.kl_coef})
        return StepResult(loss=means.get("loss/policy_avg", 0.0), metrics=means, tokens=tokens)

    def _update(self, ctx: StepContext, experience: Rollout, rows: torch.Tensor, figures: Figures) -> None:
        tokens = experience.tokens[rows]
        mask = experience.response_mask[rows].float().to(ctx.device)
        advantages = experience.advantages[rows].to(ctx.device)
        old = experience.old_logprobs[rows].to(ctx.device)
        new = _logprobs(ctx.model, tokens, ctx.device, grad=True)
        log_ratio = (new - old) * mask
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - self.algo.clip_range, 1 + self.algo.clip_range)
        policy_losses = torch.max(-advantages * ratio, -advantages * clipped)
        policy_loss = masked_mean(policy_losses, mask)
        ctx.model.backward(policy_loss)
        ctx.model.step()
        n = 1
        _add(figures, "loss/policy_avg", float(policy_loss.detach()), n)
        _add(figures, "policy/approxkl_avg", float(masked_mean(0.5 * log_ratio.detach() ** 2, mask)), n)
        _add(figures, "policy/clipfrac_avg", float(masked_mean((policy_losses.detach() != -advantages * ratio.detach())
                                                               .float(), mask)), n)
        _add(figures, "val/ratio", float(masked_mean(ratio.detach(), mask)), n)
        if experience.values is not None:
            critic = ctx.trained["critic"]
            old_values = experience.values[rows].to(ctx.device)
            returns = experience.returns[rows].to(ctx.device)
            predicted = critic(tokens.to(ctx.device)).float()[:, :-1]
            clipped_values = old_values + torch.clamp(predicted - old_values, -self.algo.clip_range_value,
                                                      self.algo.clip_range_value)
            losses = torch.max((predicted - returns) ** 2, (clipped_values - returns) ** 2)
            value_loss = 0.5 * masked_mean(losses, mask)
            critic.backward(self.algo.vf_coef * value_loss)
            critic.step()
            _add(figures, "loss/value_avg", float(value_loss.detach()), n)
            _add(figures, "val/clipfrac_avg", float(masked_mean(((predicted - returns) ** 2 < (clipped_values - returns) ** 2)
                                                                .float(), mask)), n)

    # ---- the loop's other hooks ----
    def train_micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> list:
        return []  # unused: train_step drives the iteration

    def count(self, batch: Any) -> int:
        return 1

    def loss(self, ctx: StepContext, batch: Any) -> TaskLoss:
        raise NotImplementedError("PPO runs whole iterations in train_step")

    def eval_batches(self, rank: int, world: int, micro_batch_size: int) -> list[list[int]]:
        rows = list(range(min(len(self.validation_prompts), self.eval_max_rows)))[rank::world]
        size = max(micro_batch_size, 16)
        return [rows[k:k + size] for k in range(0, len(rows), size)]

    def eval_figures(self, ctx: StepContext, batch: list[int]) -> Figures:
        """Replies to held-out prompts, sampled as in rollouts but with fixed seeds (comparable across
        evaluations): their score, KL to the reference and rule score."""
        prompts = [self.validation_prompts[i] for i in batch]
        encoded, completions = self._sample(ctx, prompts, [self.seed + 7919 * i for i in batch])
        scores, rules = self._scores(ctx, prompts, encoded, completions)
        tokens, _ = _pad([p + c.sampled_ids for p, c in zip(encoded, completions)])
        response = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
        for row, (p, c) in enumerate(zip(encoded, completions)):
            response[row, len(p) - 1:len(p) - 1 + len(c.sampled_ids)] = True
        old = _logprobs(ctx.model, tokens, ctx.device)
        ref = _logprobs(ctx.frozen["reference"], tokens, ctx.device)
        kl = (kl_per_token(old, ref, "k1") * response).sum(1)
        from pipelines.data.instructions import rule_fraction_reward

        parts = torch.tensor(rule_fraction_reward(prompts, [c.text.strip() for c in completions]))
        n = len(batch)
        return {"score": (float(scores.sum()), n), "kl": (float(kl.sum()), n), "rule_score": (float(rules.sum()), n),
                "rule_parts": (float(parts.sum()), n), "eos": (float(sum(c.finish_reason == "stop" for c in completions)), n)}

    def eval_summary(self, means: dict[str, float]) -> dict[str, float]:
        return {"val_score": means["score"], "val_kl": means["kl"], "val_rule_score": means["rule_score"],
                "val_rule_parts": means["rule_parts"],
                "val_eos_rate": means["eos"]}

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, figures: dict[str, float]) -> None:
        from model.checkpoint import save_checkpoint
        from model.llama import Transformer

        model = Transformer(self.actor.model_config())
        model.load_state_dict(state_dict, strict=False)
        save_checkpoint(model.eval(), directory, self._tokenizer(), metadata={"stage": self.name})

    def data_position(self, step: int) -> dict[str, int]:
        return self.order.position(step)


def _add(figures: Figures, name: str, value: float, count: float) -> None:
    old = figures.get(name, (0.0, 0.0))
    figures[name] = (old[0] + value * count, old[1] + count)


def _pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, s in enumerate(sequences):
        tokens[row, :len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in sequences])


def _logprobs(model, tokens: torch.Tensor, device: torch.device, grad: bool = False) -> torch.Tensor:
    """log p(token t+1 | tokens ..t) for every position: [rows, time - 1] (fp32, on CPU unless ``grad``)."""
    from model.scoring import token_logprobs

    tokens = tokens.to(device)
    with torch.set_grad_enabled(grad):
        picked = token_logprobs(model(tokens[:, :-1]), tokens[:, 1:])
    return picked if grad else picked.float().cpu()


def prepare(config: Config):
    from model.reward import reward_stats
    from pipelines.data.instructions import builtin_prompts
    from pipelines.train.plan import make_plan, resolve_precision
    from pipelines.train.trainer import decide_use_gpu

    run = RunDir(config.run)
    algo = config.algo
    if algo.estimator in ("grpo", "rloo") and algo.group_size < 2:
        raise ConfigError(f"config field 'algo.group_size': {algo.estimator} needs at least 2 replies per prompt")
    actor = resolve_model(config, ("sft",))
    reward_model = None
    if config.reward.model:
        if config.reward.model == "auto":
            if run.exists("reward", "model", "reward.json"):
                reward_model = resolve_model(config.model_copy(update={"model_from": run.uri_of("reward", "model")}),
                                             (), allow_reward=True)
        else:
            reward_model = resolve_model(config.model_copy(update={"model_from": config.reward.model}), (),
                                         allow_reward=True)
            if reward_model.kind != "reward":
                raise ConfigError(f"config field 'reward.model': {config.reward.model} is not a reward model")
    functions = list(config.reward.function)
    for spec in functions:
        load_function(spec)
    if config.reward.function_weights and len(config.reward.function_weights) != len(functions):
        raise ConfigError("config field 'reward.function_weights': give one weight per reward function")
    if reward_model is None and not functions:
        raise ConfigError(f"no reward: no reward model at {run.uri_of('reward', 'model')} (run `groundup reward "
                          f"--run {config.run}`) and no reward.function given")
    critic = None
    if algo.estimator == "gae":
        critic = reward_model or actor
    model_config = actor.model_config()
    if model_config.vocab_size != (reward_model.model_config().vocab_size if reward_model else model_config.vocab_size):
        raise ConfigError("config field 'reward.model': its vocabulary differs from the actor's")

    prompt_config = config.model_copy(update={"data": list(config.prompts)})
    examples = load_examples(prompt_config, parse_prompt, key=repr,
                             builtin=lambda split: builtin_prompts(split), builtin_name="builtin:questions")
    world = config.train.num_workers
    rows_per_rank = algo.prompts_per_iteration * algo.group_size // world
    if algo.prompts_per_iteration % world or rows_per_rank % (algo.num_minibatches * config.train.batch.micro_batch_size):
        raise ConfigError(f"config field 'algo.prompts_per_iteration': {algo.prompts_per_iteration} prompts x "
                          f"{algo.group_size} replies over {world} workers must split into {algo.num_minibatches} "
                          f"mini-batches of micro-batches of {config.train.batch.micro_batch_size}")
    if len(examples.train) < algo.prompts_per_iteration:
        raise ConfigError(f"config field 'prompts': {len(examples.train)} prompts cannot fill one iteration of "
                          f"{algo.prompts_per_iteration}")
    has_gpu, gpu_bf16 = decide_use_gpu(config.train.use_gpu, config.num_cpus)
    seq = model_config.max_seq_len
    train_config = config.train.model_copy(update={"batch": config.train.batch.model_copy(update={
        "global_batch_sequences": rows_per_rank // algo.num_minibatches * world})})
    plan = make_plan(train_config, seq, model_config.flops_per_token(seq), model_config.num_parameters,
                     resolve_precision(config.train.precision.dtype, has_gpu, gpu_bf16))
    stats = reward_stats(reward_model.path) if reward_model else {"mean": 0.0, "std": 1.0}
    task = PPOTask(actor=actor, critic=critic, reward_model=reward_model,
                   reward_stats={"mean": float(stats["mean"]), "std": float(stats["std"])},
                   train_prompts=examples.train, validation_prompts=examples.validation,
                   order=BatchOrder(len(examples.train), algo.prompts_per_iteration, config.seed), algo=algo,
                   kl=config.kl, rollout=config.rollout, reward=config.reward,
                   micro_batch_size=config.train.batch.micro_batch_size, eval_max_rows=config.train.eval.max_rows,
                   seed=config.seed)
    return loop_spec(config, STAGE, task, plan, train_config), examples, has_gpu


def run(config: Config) -> dict[str, Any]:
    from pipelines.train.stage import TrainingJob, check_resume, run_training

    started = time.time()
    check_resume(config, STAGE)
    spec, examples, use_gpu = prepare(config)
    task: PPOTask = spec.task
    rewards = ([f"reward model {task.reward_model.path}"] if task.reward_model else []) + list(config.reward.function)
    print(f"{STAGE}: actor and reference from {task.actor.path}; critic: "
          f"{task.critic.path if task.critic else 'none (' + config.algo.estimator + ')'}; reward: {', '.join(rewards)}",
          flush=True)
    print(f"{STAGE}: {spec.plan.total_steps} iterations x {config.algo.prompts_per_iteration} prompts x "
          f"{config.algo.group_size} replies, {config.algo.ppo_epochs} epochs x {config.algo.num_minibatches} "
          f"mini-batches; {len(task.validation_prompts)} held-out prompts", flush=True)
    job = TrainingJob(
        stage=STAGE, config=config, spec=spec, use_gpu=use_gpu, title=f"ppo — {config.run}",
        inputs={"actor": task.actor.path, "reward_model": task.reward_model.path if task.reward_model else None,
                "reward_functions": list(config.reward.function), "prompts": examples.sources},
        counts={"train_prompts": len(task.train_prompts), "validation_prompts": len(task.validation_prompts),
                "rejected": dict(examples.rejects.counts)},
        summary_figures=("start_val_score", "val_score", "start_val_rule_score", "val_rule_score", "val_kl"),
        plots={"rewards.png": ("objective/scores", "objective/rlhf_reward", "objective/kl", "objective/rule_score")})
    manifest = run_training(job, started)
    return add_reply_comparison(config, STAGE, {"sft": task.actor.path}, manifest)


if __name__ == "__main__":
    stage_main(STAGE)
