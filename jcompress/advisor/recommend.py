"""Constraints, the recommendation among the measured rows, and its reason in plain words.

Every choice here reads the validation accuracy (``val_accuracy``); the test accuracy of a
row is carried along for the report and never compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jcompress.advisor.pareto import pareto_front
from jcompress.advisor.records import DEFAULT_ACCURACY_DROP, LATENCY_SPREAD, Advice

__all__ = ["format_rows", "latency_vs_dense", "recommend", "summarize", "violations"]


def _check_constraints(max_bytes, max_accuracy_drop, max_latency_ms) -> dict:
    if max_bytes is not None and not (isinstance(max_bytes, (int, float)) and max_bytes > 0):
        raise ValueError(f"max_bytes={max_bytes!r} must be a positive number of bytes")
    if max_accuracy_drop is not None and not (
        isinstance(max_accuracy_drop, (int, float)) and 0 <= max_accuracy_drop < 1
    ):
        raise ValueError(
            f"max_accuracy_drop={max_accuracy_drop!r} must be a fraction in [0, 1): 0.01 allows one percentage point"
        )
    if max_latency_ms is not None and not (isinstance(max_latency_ms, (int, float)) and max_latency_ms > 0):
        raise ValueError(f"max_latency_ms={max_latency_ms!r} must be a positive number of milliseconds")
    return {"max_bytes": max_bytes, "max_accuracy_drop": max_accuracy_drop, "max_latency_ms": max_latency_ms}


def violations(row: dict, constraints: dict, *, keep_architecture: bool = False) -> dict[str, float]:
    """``{constraint: relative excess}`` for each constraint ``row`` breaks (empty if none).

    The excess is relative to the limit (``0.5`` = 50% over the byte budget); for the
    accuracy drop it is the excess in percentage points divided by ``max(limit, 0.01)``.
    ``keep_architecture`` adds ``{'architecture': inf}`` for a row that changes it.
    """
    out: dict[str, float] = {}
    if constraints.get("max_bytes") is not None and row["bytes"] > constraints["max_bytes"]:
        out["max_bytes"] = row["bytes"] / constraints["max_bytes"] - 1.0
    limit = constraints.get("max_accuracy_drop")
    if limit is not None and row["accuracy_drop"] > limit + 1e-12:
        out["max_accuracy_drop"] = (row["accuracy_drop"] - limit) / max(limit, 0.01)
    if constraints.get("max_latency_ms") is not None:
        if row.get("latency_ms") is None:
            raise ValueError("max_latency_ms is set but latency was not measured; pass inputs= to advise")
        if row["latency_ms"] > constraints["max_latency_ms"]:
            out["max_latency_ms"] = row["latency_ms"] / constraints["max_latency_ms"] - 1.0
    if keep_architecture and not row["keeps_architecture"]:
        out["architecture"] = math.inf
    return out


def _objective(constraints: dict) -> str:
    """What to optimise among feasible rows: size when only accuracy is constrained, else accuracy."""
    if constraints.get("max_bytes") is None and constraints.get("max_latency_ms") is None:
        return "bytes"
    return "accuracy"


def _sort_key(row: dict, objective: str):
    lat = row.get("latency_ms") or 0.0
    if objective == "bytes":
        return (row["bytes"], -row["val_accuracy"], lat)
    return (-row["val_accuracy"], row["bytes"], lat)


def recommend(
    rows: Sequence[dict], constraints: dict, *, keep_architecture: bool = False
) -> tuple[dict | None, dict | None]:
    """``(recommended, closest)`` among measured rows with ``pareto`` and ``violations`` filled.

    Among the Pareto rows that meet every constraint: the smallest file when only the
    accuracy drop is constrained (or nothing is), else the highest validation accuracy
    (ties: fewer bytes, then lower latency). The test accuracy is never looked at. A feasible row is always dominated by a feasible Pareto row or is
    one itself, so looking at the front loses nothing. When no row is feasible, ``closest``
    is the row with the smallest summed relative excess (rows that change the architecture
    are left out of it when ``keep_architecture``).
    """
    valid = [r for r in rows if not r.get("error")]
    feasible = [r for r in valid if not r["violations"]]
    if feasible:
        front = [r for r in feasible if r["pareto"]] or feasible
        return min(front, key=lambda r: _sort_key(r, _objective(constraints))), None
    pool = [r for r in valid if not (keep_architecture and not r["keeps_architecture"])] or valid
    if not pool:
        return None, None
    return None, min(
        pool, key=lambda r: (sum(v for k, v in r["violations"].items() if k != "architecture"), -r["val_accuracy"])
    )


def _kb(n: float) -> str:
    return f"{n / 1000:.1f} KB"


def _accuracy(row: dict) -> str:
    test = f", test {row['test_accuracy']:.2%}" if row.get("test_accuracy") is not None else ""
    return f"validation accuracy {row['val_accuracy']:.2%}{test}"


def _latency(row: dict) -> str:
    if row.get("latency_ms") is None:
        return ""
    lo, hi = row.get(LATENCY_SPREAD[0]), row.get(LATENCY_SPREAD[1])
    iqr = f" (IQR {lo:.3g}-{hi:.3g})" if lo is not None and hi is not None else ""
    vs = "" if row["family"] == "dense" else f", {row['latency_vs_dense']}"
    return f", {row['latency_ms']:.3g} ms{iqr}{vs}"


def _describe(row: dict) -> str:
    if row["family"] == "dense":
        return f"{row['name']} ({_accuracy(row)}, {_kb(row['bytes'])}{_latency(row)})"
    drop = row["accuracy_drop"] * 100
    side = f"{drop:.2f} points below dense" if drop >= 0 else f"{-drop:.2f} points above dense"
    return f"{row['name']} ({_accuracy(row)}, {side}; {_kb(row['bytes'])}, {row['ratio']:.1f}x smaller{_latency(row)})"


def _misses(row: dict, constraints: dict) -> str:
    """The broken constraints of ``row`` in words, with absolute and relative excess."""
    parts = []
    for key, rel in row["violations"].items():
        if key == "max_bytes":
            parts.append(f"the size limit by {_kb(row['bytes'] - constraints['max_bytes'])} ({rel:.0%})")
        elif key == "max_accuracy_drop":
            over = (row["accuracy_drop"] - constraints["max_accuracy_drop"]) * 100
            parts.append(f"the accuracy budget by {over:.2f} points")
        elif key == "max_latency_ms":
            parts.append(f"the latency limit by {row['latency_ms'] - constraints['max_latency_ms']:.2f} ms ({rel:.0%})")
        else:
            parts.append("the architecture requirement (it changes the layers)")
    return " and ".join(parts)


def _describe_constraints(c: dict, keep_architecture: bool) -> str:
    parts = []
    if c.get("max_bytes") is not None:
        parts.append(f"file at most {_kb(c['max_bytes'])}")
    if c.get("max_accuracy_drop") is not None:
        parts.append(f"accuracy at most {c['max_accuracy_drop'] * 100:.2f} points below dense")
    if c.get("max_latency_ms") is not None:
        parts.append(f"latency at most {c['max_latency_ms']:.2f} ms")
    if keep_architecture:
        parts.append("the same architecture")
    return ", ".join(parts) if parts else "no constraints"


_WHY = {
    "dense": "The dense model already meets every constraint, so no compression is needed for what was asked.",
    "pruning": (
        "Pruning keeps the architecture: the same layers and shapes, so the model code does not change; the "
        "zeroed weights are simply not stored."
    ),
    "quantization": (
        "Quantization keeps the architecture and every weight; each is stored in fewer bits, which costs little "
        "accuracy at 8 bits and needs fine-tuning (QAT) at 4."
    ),
    "sharing": (
        "Weight sharing keeps the architecture: every weight becomes an index into a small per-layer codebook."
    ),
    "combination": (
        "It keeps the architecture and combines techniques whose savings multiply (pruning removes weights, "
        "quantization or sharing shrinks each remaining one, Huffman coding shortens the frequent codes)."
    ),
    "structured": (
        "Structured pruning removes whole neurons or filters, so the model that remains is a smaller dense "
        "model: real size, FLOPs and latency all drop, but the layer widths change."
    ),
    "lowrank": (
        "Low-rank factorisation changes the layers (each Dense layer becomes two thinner ones), which cuts the "
        "real FLOPs and latency, not only the file."
    ),
    "distillation": (
        "A much smaller architecture was acceptable, and a student trained on the teacher's soft targets cuts "
        "size, FLOPs and latency together; you deploy the student model instead of the original."
    ),
    "custom": "It is a recipe you supplied.",
}


def _reason(rows, recommended, closest, constraints, keep_architecture, dense, assumed=False) -> str:
    valid = [r for r in rows if not r.get("error")]
    given = _describe_constraints(constraints, keep_architecture)
    if assumed:
        given = f"none given, so {given} is assumed"
    head = f"Constraints: {given}. Dense model: {_describe(dense)}."
    if recommended is None:
        if closest is None:
            return head + " No candidate could be measured."
        text = (
            f"{head} No candidate meets the constraints. The closest is {_describe(closest)}, which misses "
            f"{_misses(closest, constraints)}."
        )
        if "max_latency_ms" in closest["violations"] and closest["keeps_architecture"]:
            text += (
                " Models that keep the architecture run at dense speed here (masks and codes are decoded to dense "
                "arrays); a lower latency needs a smaller architecture (distillation, low rank) or sparse or "
                "integer kernels."
            )
        return text + " Relax a constraint or try stronger recipes (more sparsity, fewer bits, a smaller student)."
    text = f"{head} Recommended: {_describe(recommended)}. {_WHY[recommended['family']]}"
    fam = recommended["family"]
    singles = [r for r in valid if r["family"] in ("pruning", "quantization", "sharing")]
    if fam == "combination" and singles and not any(not r["violations"] for r in singles):
        best = min(singles, key=lambda r: sum(r["violations"].values()))
        text += f" No single technique was enough: the best alone, {best['name']}, misses {_misses(best, constraints)}."
    if constraints.get("max_latency_ms") is not None and recommended["keeps_architecture"] and fam != "dense":
        text += (
            " Its masks and codes are decoded to dense arrays before the forward pass, so it runs the dense matmuls "
            f"(measured: {recommended['latency_vs_dense']}; dense {dense['latency_ms']:.3g} ms); it meets the latency "
            "limit only because the dense model does."
        )
    lat_fail = [r for r in valid if r["keeps_architecture"] and "max_latency_ms" in r["violations"]]
    if fam in ("distillation", "lowrank", "structured") and lat_fail and constraints.get("max_latency_ms") is not None:
        text += (
            " Pruned and quantized models keep the dense shapes and run at dense speed here, so none of them met "
            "the latency limit; only a smaller architecture did."
        )
    if fam in ("distillation", "lowrank", "structured") and keep_architecture is False:
        same = [r for r in valid if r["keeps_architecture"] and r["family"] != "dense" and not r["violations"]]
        if not same:
            text += " No recipe that keeps the architecture met the constraints."
    return text


def latency_vs_dense(row: dict, dense: dict) -> tuple[str | None, float | None]:
    """``(verdict, speedup)`` of ``row``'s latency against the dense row's.

    A difference counts only when it is larger than the spread: when the two
    interquartile ranges (``latency_q1_ms``..``latency_q3_ms``; the median alone for a row
    without them) do not overlap. Then the verdict is ``'2.10x faster'`` or ``'1.30x
    slower'`` and the speedup is dense median / row median; otherwise ``('same as dense',
    None)``. ``(None, None)`` when either latency was not measured.

    Example:
      >>> latency_vs_dense({'latency_ms': 1.9, 'latency_q1_ms': 1.8, 'latency_q3_ms': 2.1},
      ...                  {'latency_ms': 2.0, 'latency_q1_ms': 1.9, 'latency_q3_ms': 2.2})
      ('same as dense', None)
    """
    lat, dlat = row.get("latency_ms"), dense.get("latency_ms")
    if lat is None or dlat is None:
        return None, None
    lo, hi = (row.get(c, lat) for c in LATENCY_SPREAD)
    dlo, dhi = (dense.get(c, dlat) for c in LATENCY_SPREAD)
    if hi < dlo:
        return f"{dlat / lat:.2f}x faster", dlat / lat
    if lo > dhi:
        return f"{lat / dlat:.2f}x slower", dlat / lat
    return "same as dense", None


def format_rows(rows: Sequence[dict]) -> str:
    """A fixed-width text table of measured rows (Pareto rows marked with ``*``).

    Columns: validation accuracy (what the choice uses), test accuracy (reported only),
    the drop below dense on validation in points, bytes, ratio, the median latency with its
    interquartile range, and the latency against dense ("same" within the spread).
    """
    head = (
        f"{'':2}{'candidate':<34}{'val acc':>8}{'test acc':>9}{'drop':>7}{'bytes':>11}{'ratio':>7}"
        f"{'ms (IQR)':>22}  {'vs dense':<14}feasible"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{'':2}{r['name']:<34}  failed: {r['error']}")
            continue
        if r.get("latency_ms") is None:
            lat = f"{'-':>22}"
        elif r.get(LATENCY_SPREAD[0]) is None:
            lat = f"{r['latency_ms']:>22.3f}"
        else:
            lat = f"{r['latency_ms']:.3f} ({r[LATENCY_SPREAD[0]]:.3f}-{r[LATENCY_SPREAD[1]]:.3f})".rjust(22)
        vs = "reference" if r["family"] == "dense" else (r.get("latency_vs_dense") or "-")
        test = f"{r['test_accuracy']:>9.4f}" if r.get("test_accuracy") is not None else f"{'-':>9}"
        mark = "* " if r.get("pareto") else "  "
        lines.append(
            f"{mark}{r['name']:<34}{r['val_accuracy']:>8.4f}{test}{r['accuracy_drop'] * 100:>+7.2f}{r['bytes']:>11,}"
            f"{r['ratio']:>7.1f}{lat}  {vs:<14}{'yes' if not r['violations'] else 'no'}"
        )
    return "\n".join(lines)


def summarize(
    rows: Sequence[dict],
    *,
    max_bytes: float | None = None,
    max_accuracy_drop: float | None = None,
    max_latency_ms: float | None = None,
    keep_architecture: bool = False,
    latency_tolerance: float = 0.1,
) -> Advice:
    """The advice for already measured rows: derived columns, Pareto front, recommendation, reason.

    Args:
      rows: dicts with ``name``, ``family``, ``keeps_architecture``, ``val_accuracy``,
        ``bytes`` and ``latency_ms`` (``None`` when not measured), optionally
        ``test_accuracy`` (reported, never compared) and the latency spread
        ``latency_q1_ms``/``latency_q3_ms``; or ``name``, ``family``, ``error`` for a failed
        recipe. Exactly one row has family ``'dense'``: the reference that accuracy drops,
        ratios and speedups are measured against.
      max_bytes, max_accuracy_drop, max_latency_ms, keep_architecture: the constraints
        (see :func:`advise`).
      latency_tolerance: latencies within this relative difference count as equal on the
        Pareto front (timing noise would otherwise split equal-speed models); so do
        latencies whose interquartile ranges overlap.

    Returns:
      :class:`Advice`; its rows are copies of ``rows`` with ``accuracy_drop``, ``ratio``,
      ``latency_vs_dense``, ``speedup`` (see :func:`latency_vs_dense`), ``violations``,
      ``feasible`` and ``pareto`` added.

    Raises:
      ValueError: bad constraints, no dense row or several, duplicate names.
    """
    constraints = _check_constraints(max_bytes, max_accuracy_drop, max_latency_ms)
    assumed = all(v is None for v in constraints.values())
    if assumed:
        constraints["max_accuracy_drop"] = DEFAULT_ACCURACY_DROP
    names = [r["name"] for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"candidate names must be unique; repeated: {dup}")
    dense_rows = [r for r in rows if r.get("family") == "dense" and not r.get("error")]
    if len(dense_rows) != 1:
        raise ValueError(
            f"rows need exactly one measured row of family 'dense' (the reference), found {len(dense_rows)}"
        )
    dense = dense_rows[0]
    out = []
    for r in rows:
        r = dict(r)
        if not r.get("error"):
            for key in ("val_accuracy", "bytes", "keeps_architecture", "family"):
                if key not in r:
                    raise ValueError(f"row {r['name']!r} has no {key!r}; measured rows need {key}")
            r["accuracy_drop"] = dense["val_accuracy"] - r["val_accuracy"]
            r["ratio"] = dense["bytes"] / r["bytes"] if r["bytes"] else math.inf
            if r["name"] == dense["name"] and r.get("latency_ms") is not None:
                r["latency_vs_dense"], r["speedup"] = "reference", 1.0
            else:
                r["latency_vs_dense"], r["speedup"] = latency_vs_dense(r, dense)
            r["violations"] = violations(r, constraints, keep_architecture=keep_architecture)
            r["feasible"] = not r["violations"]
        out.append(r)
    front = pareto_front(out, tolerance={"latency_ms": latency_tolerance}, spread={"latency_ms": LATENCY_SPREAD})
    on_front = {id(r) for r in front}
    for r in out:
        if not r.get("error"):
            r["pareto"] = id(r) in on_front
    recommended, closest = recommend(out, constraints, keep_architecture=keep_architecture)
    dense_out = next(r for r in out if r["name"] == dense["name"])
    reason = _reason(out, recommended, closest, constraints, keep_architecture, dense_out, assumed)
    return Advice(out, front, recommended, reason, closest, constraints)
