"""The evaluation's outputs for people: a Markdown report (one table per task, then samples) and a PNG
that compares the models on each task's main metric with its standard error."""
from __future__ import annotations

import io
from typing import Any

# The metric each kind of task is compared on (first one present), and whether lower is better.
PRIMARY = ("bits_per_byte", "acc", "exact_match", "win_rate_reward", "win_rate_rule", "refusal_failure_rate")
LOWER_IS_BETTER = {"bits_per_byte", "perplexity", "loss", "pii_rate", "refusal_failure_rate"}


def primary_metric(metrics: dict[str, Any]) -> str | None:
    return next((m for m in PRIMARY if m in metrics), next(iter(metrics), None))


def _fmt(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "—"
    value, stderr = entry.get("value"), entry.get("stderr")
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if value is None:
        return "—"
    text = f"{value:.4f}"
    if stderr is not None:
        text += f" ± {stderr:.4f}"
    if "low" in entry and "high" in entry:
        text += f" [{entry['low']:.3f}, {entry['high']:.3f}]"
    return text


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Evaluation of {results['run']}", ""]
    lines.append("| model | path |")
    lines.append("|---|---|")
    for name, info in results["models"].items():
        lines.append(f"| {name} | `{info['path']}` |")
    lines.append("")
    for task, info in results["tasks"].items():
        lines.append(f"## {task}")
        lines.append("")
        if info.get("description"):
            lines.append(info["description"])
            lines.append("")
        rows = {model: per_task[task] for model, per_task in results["results"].items() if task in per_task}
        metrics: list[str] = []
        for entry in rows.values():
            metrics.extend(m for m in entry["metrics"] if m not in metrics)
        if rows:
            lines.append("| model | " + " | ".join(metrics) + " |")
            lines.append("|---|" + "---|" * len(metrics))
            for model, entry in rows.items():
                if entry.get("error"):
                    lines.append(f"| {model} | failed: {entry['error']} |" + " |" * (len(metrics) - 1))
                    continue
                lines.append(f"| {model} | " + " | ".join(_fmt(entry["metrics"].get(m)) for m in metrics) + " |")
            lines.append("")
        dirty = info.get("contamination")
        if dirty:
            lines.append(f"Decontamination: {dirty['contaminated']} of {dirty['examples']} examples share a "
                         f"{dirty['ngram']}-gram with the training shards"
                         + (f" (ids {dirty['contaminated_ids'][:20]}{' ...' if dirty['contaminated'] > 20 else ''})"
                            if dirty["contaminated"] else "") + ".")
            lines.append("")
        for model, entry in rows.items():
            samples = entry.get("samples") or []
            if not samples:
                continue
            lines.append(f"<details><summary>samples: {model}</summary>")
            lines.append("")
            for sample in samples:
                lines.append("```")
                for key, value in sample.items():
                    lines.append(f"{key}: {value}")
                lines.append("```")
            lines.append("</details>")
            lines.append("")
    if results.get("notes"):
        lines.append("## Notes")
        lines.append("")
        lines.extend(f"- {note}" for note in results["notes"])
        lines.append("")
    return "\n".join(lines)


def comparison_png(results: dict[str, Any]) -> bytes:
    """One panel per task: each model's main metric with its standard error as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in results["tasks"] if any(t in r and not r[t].get("error") for r in results["results"].values())]
    models = list(results["models"])
    columns = max(1, min(3, len(tasks)))
    rows = max(1, (len(tasks) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, task in enumerate(tasks):
        ax = axes[index // columns][index % columns]
        metric = None
        values, errors, names = [], [], []
        for model in models:
            entry = results["results"].get(model, {}).get(task)
            if not entry or entry.get("error"):
                continue
            metric = metric or primary_metric(entry["metrics"])
            point = entry["metrics"].get(metric) or {}
            if not isinstance(point.get("value"), (int, float)):
                continue
            values.append(point["value"])
            errors.append(point.get("stderr") or 0.0)
            names.append(model)
        ax.bar(range(len(values)), values, yerr=errors, capsize=4,
               color=[colours[models.index(n) % len(colours)] for n in names])
        ax.set_xticks(range(len(values)), names, rotation=20, fontsize=8)
        arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        ax.set_title(f"{task}\n{metric} ({arrow})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for index in range(len(tasks), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(f"models compared — {results['run']}", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
