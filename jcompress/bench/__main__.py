"""``python -m jcompress.bench [--quick] [--json FILE] [--only b1_threshold,...]``

Runs every benchmark module ``jcompress/bench/b*.py`` in order. Each module's
``run(quick)`` returns rows with at least ``name``, ``ratio``, ``target`` and ``met``
(``None`` for a figure that is reported without a target);
every ratio is measured side by side in the same run against its baseline. Prints a
table and, with ``--json``, writes the rows (plus the machine description).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import sys
import time

import jcompress.bench as bench_pkg

__all__ = ["machine", "main"]


def machine() -> dict:
    import jax

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": sys.version.split()[0],
    }


def modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name[:1] == "b" and m.name[1:2].isdigit()
    )


def main(args=None) -> int:
    if args is None or isinstance(args, list):
        p = argparse.ArgumentParser(prog="python -m jcompress.bench", description=__doc__)
        p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
        p.add_argument("--json", default=None, help="write the rows to this file")
        p.add_argument("--only", default=None, help="comma-separated module names, e.g. b1_threshold")
        args = p.parse_args(args)
    names = modules()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in wanted]
    rows: list[dict] = []
    for name in names:
        t0 = time.perf_counter()
        module = importlib.import_module(f"jcompress.bench.{name}")
        out = module.run(quick=bool(args.quick))
        for r in out:
            r.setdefault("module", name)
            verdict = "" if r.get("met") is None else ("met" if r["met"] else "NOT met")
            print(f"{r['name']:<58} ratio {r['ratio']:>9.3f}  target {r['target']:<8} {verdict}", flush=True)
        rows.extend(out)
        print(f"  ({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    if args.json:
        from jcompress.report import save_json

        save_json({"machine": machine(), "quick": bool(args.quick), "benchmarks": rows}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
