"""``python -m pipelines.data ...``: the data stage as a Ray job entrypoint."""
from pipelines.cli import stage_main

if __name__ == "__main__":
    stage_main("data")
