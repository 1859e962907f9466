"""``python -m pipelines.evaluate ...``: the stage as a Ray job entrypoint."""
from pipelines.cli import stage_main

stage_main("evaluate")
