"""The ``groundup`` command: one subcommand per stage.

Every stage module exposes ``Config`` (a pydantic model), ``CLI_FLAGS`` (argparse flags whose ``dest``
is a config field) and ``run(config) -> manifest``. This module turns flags, ``--config FILE`` and
``key=value`` overrides into a validated config and calls ``run``. User mistakes print one line and
exit with status 2; stage modules are imported only when their subcommand runs, so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import ConfigError, build_config


@dataclass(frozen=True)
class Flag:
    """An argparse flag that sets the config field ``dest``."""

    names: tuple[str, ...]
    dest: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    command: str  # "data", or "prefs export" for a nested command
    module: str
    help: str


STAGES: tuple[Stage, ...] = (
    Stage("quickstart", "pipelines.quickstart", "run every stage that exists on the built-in corpus"),
    Stage("data", "pipelines.data.stage", "clean, deduplicate and tokenize corpora (Ray Data)"),
    Stage("pretrain", "pipelines.pretrain", "pretrain the decoder on packed shards (Ray Train + DeepSpeed)"),
    Stage("tune", "pipelines.tune", "search pretraining hyper-parameters at equal compute (Ray Tune + ASHA)"),
    Stage("scaling", "pipelines.scaling", "IsoFLOP sweeps and fitted scaling laws (`scaling predict` sizes a model)"),
    Stage("scaling predict", "pipelines.scaling_predict", "the model, tokens and loss the fitted laws give a budget"),
    Stage("sft", "pipelines.sft", "supervised fine-tuning on conversations (Ray Train + DeepSpeed)"),
    Stage("reward", "pipelines.reward", "train a reward model on preference pairs (Ray Train + DeepSpeed)"),
    Stage("dpo", "pipelines.dpo", "direct preference optimisation against a frozen reference"),
    Stage("ppo", "pipelines.ppo", "PPO / GRPO / RLOO from a reward model and reward functions"),
    Stage("serve", "serving.app", "serve models behind an OpenAI-compatible API with the rating UI"),
    Stage("prefs export", "ui.export", "export stored votes as preference pairs for reward modelling"),
    Stage("export", "pipelines.export", "convert a checkpoint to Hugging Face's Llama layout (or back with --from-hf)"),
    Stage("evaluate", "pipelines.evaluate", "score every model of a run: bits per byte, lm-eval tasks, win rates"),
)


def _available(stage: Stage) -> bool:
    return importlib.util.find_spec(stage.module) is not None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(stages: Sequence[Stage] = STAGES) -> argparse.ArgumentParser:
    parser = _Parser(prog="groundup", description="Build a language model from the ground up, on Ray.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for stage in stages:
        if not _available(stage):
            continue
        words = stage.command.split()
        target = commands
        if len(words) == 2 and any(s.command == words[0] for s in stages):
            continue  # "scaling predict" beside the stage "scaling": main() picks it from the next word
        if len(words) == 2:
            if words[0] not in groups:
                group_parser = commands.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                                               parser_class=_Parser)
            target = groups[words[0]]
        # No -h here: "groundup STAGE --help" falls through to the stage's full parser (stage_parser),
        # which lists the stage's own flags once its module is imported.
        sub = target.add_parser(words[-1], help=stage.help, description=stage.help, add_help=False)
        sub.set_defaults(stage=stage)
        sub.add_argument("--config", metavar="FILE", help="YAML recipe with config fields")
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        sub.add_argument("--verbose", action="store_true", help="show Ray's own messages on the console")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    return parser


def stage_parser(stage: Stage, module: Any) -> argparse.ArgumentParser:
    """The full parser of one stage: common options plus the stage module's own flags."""
    sub = _Parser(prog=f"groundup {stage.command}", description=stage.help,
                  epilog=getattr(module, "SUBCOMMANDS_HELP", None))
    sub.add_argument("--config", metavar="FILE", help="YAML recipe with config fields")
    sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    sub.add_argument("--verbose", action="store_true",
                     help="show Ray's own messages on the console (default: <run>/logs/<command>.log)")
    for flag in getattr(module, "CLI_FLAGS", ()):
        sub.add_argument(*flag.names, dest=flag.dest, help=flag.help, default=None, **flag.kwargs)
    positionals = [name.upper() for name in getattr(module, "POSITIONALS", ())]
    sub.add_argument("overrides", nargs="*", metavar=" ".join([*positionals, "key=value"]),
                     help=f"{', '.join(positionals)}, then config field overrides" if positionals
                     else "config field overrides")
    return sub


def run_stage(command: str, argv: Sequence[str]) -> Any:
    """Parse a stage's arguments, build its config and run it.

    Also the entry point of ``python -m pipelines.<stage>`` (how Ray jobs start a stage).
    """
    stage = next(s for s in STAGES if s.command == command)
    module = importlib.import_module(stage.module)
    subcommands = getattr(module, "SUBCOMMANDS", {})  # e.g. "groundup data inspect": {"inspect": main(argv)}
    if argv and argv[0] in subcommands:
        return subcommands[argv[0]](list(argv[1:]))
    positionals = getattr(module, "POSITIONALS", ())  # e.g. `groundup export MODEL_DIR OUT`
    # Intermixed: key=value overrides may come before and after flags (argparse would reject the later ones).
    parsed = stage_parser(stage, module).parse_intermixed_args(list(argv))
    flags = getattr(module, "CLI_FLAGS", ())
    values = {f.dest: getattr(parsed, f.dest) for f in flags if getattr(parsed, f.dest) is not None}
    if positionals:  # plain words (no key=value) fill the module's positional fields in order
        words = [item for item in parsed.overrides if "=" not in item]
        if len(words) > len(positionals):
            raise ConfigError(f"unexpected argument {words[len(positionals)]!r} (takes {', '.join(positionals).upper()})")
        values.update(zip(positionals, words))
        parsed.overrides = [item for item in parsed.overrides if "=" in item]
    config = build_config(module.Config, parsed.config, parsed.overrides, values)
    if parsed.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return None
    from pipelines import console

    console.start(command, getattr(config, "run", None), verbose=parsed.verbose)
    return module.run(config)


def stage_main(command: str) -> None:
    """``if __name__ == "__main__": stage_main("data")`` in each stage module."""
    sys.exit(main([*command.split(), *sys.argv[1:]]))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass only picks the subcommand; stage flags are parsed once its module is imported.
    args, _ = parser.parse_known_args(argv)
    if getattr(args, "stage", None) is None:
        if argv and argv[0] in ("-h", "--help") or not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)  # prints the "invalid choice" error and exits 2
        return 2
    stage_argv = argv[len(args.stage.command.split()):]
    nested = next((s for s in STAGES if stage_argv and s.command == f"{args.stage.command} {stage_argv[0]}"), None)
    if nested is not None and _available(nested):  # e.g. "scaling predict" beside the stage "scaling"
        args.stage, stage_argv = nested, stage_argv[1:]
    try:
        run_stage(args.stage.command, stage_argv)
    except ConfigError as err:
        print(f"groundup {args.stage.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"groundup {args.stage.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
