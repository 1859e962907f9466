"""What people see at the end of the data stage: a funnel chart (PNG) and a one-screen summary."""
from __future__ import annotations

import io
from typing import Any


def funnel_steps(counts: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(label, documents, bytes) after each step, from the manifest's counts."""
    docs_in, bytes_in = counts["documents_in"], counts["bytes_in"]
    readable = docs_in - counts["quarantined"]
    after_filters = readable - counts["dropped"]
    kept = counts["kept"]
    return [
        ("input", docs_in, bytes_in),
        ("readable", readable, bytes_in - counts["bytes_quarantined"]),
        ("cleaned + filtered", after_filters, counts["bytes_out"] + counts["bytes_duplicates"]),
        ("deduplicated (kept)", kept, counts["bytes_out"]),
    ]


def funnel_png(counts: dict[str, Any], title: str = "data funnel") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = funnel_steps(counts)
    labels = [s[0] for s in steps][::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, index, unit in ((axes[0], 1, "documents"), (axes[1], 2, "MB")):
        values = [s[index] / (1e6 if unit == "MB" else 1) for s in steps][::-1]
        bars = ax.barh(labels, values, color="#4c72b0")
        ax.set_xlabel(unit)
        top = max(values) if values and max(values) > 0 else 1
        for bar, value in zip(bars, values):
            ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2,
                    f"{value:,.0f}" if unit == "documents" else f"{value:,.2f}", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.2)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def summary_text(manifest: dict[str, Any]) -> str:
    counts, outputs, timings = manifest["counts"], manifest["outputs"], manifest["timings"]
    lines = [
        f"data: {counts['documents_in']:,} documents in ({counts['bytes_in'] / 1e6:.2f} MB) -> "
        f"{counts['kept']:,} kept ({counts['bytes_out'] / 1e6:.2f} MB)",
        f"  quarantined {counts['quarantined']:,}   dropped {counts['dropped']:,}   "
        f"duplicates {counts['duplicates']:,} (exact {counts['duplicates_exact']:,}, near {counts['duplicates_near']:,})",
    ]
    if counts.get("files_skipped"):
        lines.append(f"  input files skipped {counts['files_skipped']:,}: " + ", ".join(
            f"{r} {n:,}" for r, n in counts["files_skipped_by_reason"].items()) + " (manifest: inputs.skipped_files)")
    reasons = sorted(counts["by_reason"].items(), key=lambda kv: -kv[1])[:8]
    if reasons:
        lines.append("  top reasons: " + ", ".join(f"{r} {n:,}" for r, n in reasons))
    pii = counts.get("pii", {})
    if any(pii.values()):
        lines.append("  PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in pii.items()))
    for split in ("train", "validation"):
        s = outputs["splits"][split]
        lines.append(f"  {split:<10} {s['documents']:,} docs  {s['tokens']:,} tokens  {s['rows']:,} rows "
                     f"in {len(s['shards'])} shard(s)")
    tok = manifest["figures"].get("tokenizer", {})
    lines.append(f"  tokenizer: vocab {outputs['vocab_size']:,} ({outputs['dtype']}), "
                 f"{tok.get('bytes_per_token', 0):.2f} bytes/token; "
                 f"wall {timings['wall_s']:.1f}s -> {manifest['outputs']['tokenizer']}")
    return "\n".join(lines)
