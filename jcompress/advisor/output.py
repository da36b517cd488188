"""The written advice: plot, markdown and JSON."""

from __future__ import annotations

from pathlib import Path

from jcompress import report
from jcompress.advisor.records import Advice

__all__ = ["plot", "plot_figure", "write_advice"]


def plot_figure(advice: Advice):
    """A matplotlib figure: accuracy against bytes (log scale) and against latency.

    Pareto rows are blue, the others gray; triangles change the architecture; the
    recommended row is ringed in red; constraints are red lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in advice.rows if not r.get("error")]
    has_lat = all(r.get("latency_ms") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_lat else 1, figsize=(11 if has_lat else 6, 4.5), squeeze=False)
    panels = [("bytes", "file size (bytes, log scale)")] + ([("latency_ms", "forward latency (ms)")] if has_lat else [])
    for ax, (key, label) in zip(axes[0], panels):
        for r in rows:
            color = "tab:blue" if r["pareto"] else "tab:gray"
            ax.scatter(r[key], r["accuracy"], c=color, marker="o" if r["keeps_architecture"] else "^", s=40, zorder=3)
            ax.annotate(r["name"], (r[key], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if advice.recommended is not None:
            r = advice.recommended
            ax.scatter(r[key], r["accuracy"], s=160, facecolors="none", edgecolors="tab:red", linewidths=2, zorder=4)
        limit = advice.constraints.get("max_bytes" if key == "bytes" else "max_latency_ms")
        if limit is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1)
        drop = advice.constraints.get("max_accuracy_drop")
        dense = next(r for r in rows if r["family"] == "dense")
        if drop is not None:
            ax.axhline(dense["accuracy"] - drop, color="tab:red", linestyle=":", linewidth=1)
        if key == "bytes":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].set_title("blue: Pareto front, red ring: recommended; ^ = new architecture", fontsize=9)
    fig.tight_layout()
    return fig


def plot(advice: Advice, path: str | Path) -> None:
    """Save :func:`plot_figure` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = plot_figure(advice)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(advice: Advice) -> str:
    cols = [
        "name",
        "family",
        "accuracy",
        "accuracy_drop",
        "bytes",
        "ratio",
        "latency_ms",
        "speedup",
        "pareto",
        "feasible",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in advice.rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | {r['family']} | failed: {r['error']} |" + " |" * (len(cols) - 3))
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "# Compression advice\n\n" + "\n".join(lines) + f"\n\n{advice.reason}\n"


def write_advice(advice: Advice, out: str | Path) -> dict[str, Path]:
    """Write ``advice.json``, ``advice.md`` and ``plot.png`` under ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "advice.json", "md": out / "advice.md", "plot": out / "plot.png"}
    report.save_json(
        {
            "rows": advice.rows,
            "pareto": [r["name"] for r in advice.pareto],
            "recommended": advice.recommended["name"] if advice.recommended else None,
            "closest": advice.closest["name"] if advice.closest else None,
            "reason": advice.reason,
            "constraints": advice.constraints,
        },
        paths["json"],
    )
    paths["md"].write_text(_markdown(advice))
    plot(advice, paths["plot"])
    return paths
