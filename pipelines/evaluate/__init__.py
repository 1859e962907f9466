"""``groundup evaluate``: every model of a run scored on the same work, one report (see ``stage``).

Parts: ``scorer`` (what evaluation asks of a model, in-process or over HTTP), ``language`` (bits per
byte and perplexity), ``tasks`` (lm-eval-format tasks run through ``lm_eval``, the built-in tasks),
``contamination`` (13-gram overlap with the training shards), ``report`` (Markdown and PNG).
"""
from pipelines.evaluate.stage import CLI_FLAGS, STAGE, Config, run

__all__ = ["CLI_FLAGS", "STAGE", "Config", "run"]
