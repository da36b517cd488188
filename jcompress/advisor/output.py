"""The written advice: plot, markdown and JSON."""

from __future__ import annotations

from pathlib import Path

from jcompress import report
from jcompress.advisor.records import Advice

__all__ = ["plot", "plot_figure", "write_advice"]


def _place_labels(ax, points: list[tuple[float, float]], labels: list[str], bars=(), fontsize: float = 8) -> list:
    """Write ``labels`` next to ``points`` (data coordinates) so that no two labels overlap.

    Each label tries offsets around its point, nearest first, and takes the first whose box
    overlaps neither an already placed label, nor any marker, nor any horizontal bar of
    ``bars`` (``(x0, x1, y)`` in data coordinates); a label placed away from its point gets
    a thin leader line. Needs the axes limits to be final.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    marker = 7.0  # half the side of the box kept clear around each marker, in pixels
    taken = [(x - marker, y - marker, x + marker, y + marker) for x, y in (to_px(p) for p in points)]
    for x0, x1, y in bars:
        (a, b), (c, _) = to_px((x0, y)), to_px((x1, y))
        taken.append((a, b - 2, c, b + 2))
    steps = [(dx, dy) for r in (9, 16, 28, 42, 60) for dx, dy in
             ((r, r), (r, -r), (-r, r), (-r, -r), (r, 0), (-r, 0), (0, r), (0, -r))]  # fmt: skip
    texts = []
    for (x, y), label in zip(points, labels):
        px, py = to_px((x, y))
        text = ax.annotate(
            label,
            (x, y),
            xytext=(0, 0),
            textcoords="offset pixels",
            fontsize=fontsize,
            ha="left",
            va="bottom",
            zorder=5,
        )
        box = text.get_window_extent(renderer)
        w, h = box.width, box.height
        for dx, dy in steps:
            # the box's corner nearest the point sits at the offset
            x0 = px + dx if dx >= 0 else px + dx - w
            y0 = py + dy if dy >= 0 else py + dy - h
            if dx == 0:
                x0 = px - w / 2
            if dy == 0:
                y0 = py - h / 2
            cand = (x0 - 1, y0 - 1, x0 + w + 1, y0 + h + 1)
            if not any(cand[0] < b[2] and b[0] < cand[2] and cand[1] < b[3] and b[1] < cand[3] for b in taken):
                break
        taken.append(cand)
        text.xyann = (x0 - px, y0 - py)
        if abs(dx) > 9 or abs(dy) > 9:  # away from its point: a leader line shows which point it names
            ax.annotate("", (x, y), xytext=(x0 + w / 2 - px, y0 + h / 2 - py), textcoords="offset pixels",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6, "shrinkA": 4, "shrinkB": 3})  # fmt: skip
        texts.append(text)
    return texts


def _bytes_label(n: float, _pos=None) -> str:
    """``2000 -> '2k'``, ``1.5e6 -> '1.5M'``: short tick labels that do not run into each other."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


def plot_figure(advice: Advice):
    """A matplotlib figure: validation accuracy against bytes (log scale) and against latency.

    Each candidate is a number at its point (placed so that no two overlap), and the key
    under the panels names it. Pareto rows are blue, the others gray; triangles change
    the architecture; the recommended row is ringed in red; constraints are red lines;
    latency points carry their interquartile range as a horizontal bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [r for r in advice.rows if not r.get("error")]
    has_lat = all(r.get("latency_ms") is not None for r in rows)
    lines = (len(rows) + 1) // 2
    fig, axes = plt.subplots(1, 2 if has_lat else 1, figsize=(11 if has_lat else 6, 4.5 + 0.2 * lines), squeeze=False)
    panels = [("bytes", "file size (bytes, log scale)")] + ([("latency_ms", "forward latency (ms)")] if has_lat else [])
    dense = next(r for r in rows if r["family"] == "dense")
    for ax, (key, label) in zip(axes[0], panels):
        for r in rows:
            color = "tab:blue" if r["pareto"] else "tab:gray"
            marker = "o" if r["keeps_architecture"] else "^"
            ax.scatter(r[key], r["val_accuracy"], c=color, marker=marker, s=40, zorder=3)
            if key == "latency_ms" and r.get("latency_q1_ms") is not None:
                ax.plot([r["latency_q1_ms"], r["latency_q3_ms"]], [r["val_accuracy"]] * 2, color=color, lw=1.5)
        if advice.recommended is not None:
            r = advice.recommended
            ax.scatter(
                r[key], r["val_accuracy"], s=160, facecolors="none", edgecolors="tab:red", linewidths=2, zorder=4
            )
        limit = advice.constraints.get("max_bytes" if key == "bytes" else "max_latency_ms")
        if limit is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1)
        drop = advice.constraints.get("max_accuracy_drop")
        if drop is not None:
            ax.axhline(dense["val_accuracy"] - drop, color="tab:red", linestyle=":", linewidth=1)
        if key == "bytes":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(_bytes_label))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(0.12)
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].set_title("blue: Pareto front, red ring: recommended; ^ = new architecture", fontsize=9)
    key_text = [f"{i:>2}  {r['name']}" for i, r in enumerate(rows, 1)]
    half = (len(key_text) + 1) // 2
    key_top = (0.1 + 0.135 * half) / (4.5 + 0.2 * lines)  # the key's height (inches) over the figure's
    for col, chunk in enumerate((key_text[:half], key_text[half:])):
        fig.text(0.06 + 0.47 * col, key_top, "\n".join(chunk), fontsize=8, va="top", family="monospace")
    fig.tight_layout(rect=(0, key_top + 0.02, 1, 1))
    for ax, (key, _) in zip(axes[0], panels):
        spread = [r for r in rows if key == "latency_ms" and r.get("latency_q1_ms") is not None]
        bars = [(r["latency_q1_ms"], r["latency_q3_ms"], r["val_accuracy"]) for r in spread]
        _place_labels(ax, [(r[key], r["val_accuracy"]) for r in rows], [str(i) for i in range(1, len(rows) + 1)], bars)
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
        "val_accuracy",
        "test_accuracy",
        "accuracy_drop",
        "bytes",
        "ratio",
        "latency_ms",
        "latency_q1_ms",
        "latency_q3_ms",
        "latency_vs_dense",
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
    note = (
        "Chosen on validation accuracy (`val_accuracy`, `accuracy_drop`); `test_accuracy` is measured once per "
        "candidate and never used for the choice. Latency: median of interleaved forward passes (compilation "
        "excluded) with its interquartile range (`latency_q1_ms`-`latency_q3_ms`); a difference from dense "
        "within that spread is `same as dense`."
    )
    return "# Compression advice\n\n" + "\n".join(lines) + f"\n\n{note}\n\n{advice.reason}\n"


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
