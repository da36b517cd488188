"""Write TESTING.md from the test suite's own counts.

Runs the bad-input table (tests/test_validation.py), the command-line checks
(tests/test_cli_validation.py, tests/test_tfds.py), the fuzz of the public transforms
(tests/test_fuzz.py, tests/test_fuzz_models.py), the injected-fault tests and every hypothesis property test, then
summarises from pytest's JUnit XML and hypothesis's statistics: every public entry point
with the arguments it validates, how many bad inputs of each kind were tried and how each
ended, what the fuzz gave each transform (by kind of input) and how it ended, which
faults were injected and what happened, and how many random examples each property saw.

Usage: python scripts/testing_report.py [--out TESTING.md]
"""

from __future__ import annotations

import argparse
import ast
import collections
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULT_TESTS = {
    "tests/test_crash_resume.py": "SIGKILL of a training run while it writes a checkpoint; the run is restarted",
    "tests/test_multiprocess_faults.py": "SIGKILL of one process (a worker, or the coordinator) of a 2-process jax.distributed run",
    "tests/test_distill_multihost.py": "a 2-process x 2-device distillation run on localhost, and a failing worker",
}


CLI_TESTS = ["tests/test_cli_validation.py", "tests/test_tfds.py"]
FUZZ_TESTS = ("tests/test_fuzz.py", "tests/test_fuzz_models.py")


def property_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "@given" in p.read_text())


def run_pytest(files: list[str], xml: Path) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "--hypothesis-show-statistics", *files]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    return proc.stdout + proc.stderr


def outcomes(xml: Path) -> dict[str, str]:
    """``{'tests/test_x.py::test_name[id]': 'passed' | 'FAILED' | 'skipped'}``."""
    result = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            result[name] = "FAILED"
        elif case.find("skipped") is not None:
            result[name] = "skipped"
        else:
            result[name] = "passed"
    return result


def hypothesis_examples(log: str) -> dict[str, int]:
    counts, current = {}, None
    for line in log.splitlines():
        m = re.match(r"^(tests/\S+::\S+):\s*$", line.strip())
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) passing(?: examples?)?, (\d+) failing", line)
        if m and current:
            counts[current] = counts.get(current, 0) + int(m.group(1)) + int(m.group(2))
    return counts


def hypothesis_events(log: str) -> dict[str, dict[str, float]]:
    """``{test: {event: percent of its examples}}`` from ``--hypothesis-show-statistics``."""
    events: dict = collections.defaultdict(dict)
    current = None
    for line in log.splitlines():
        m = re.match(r"^(tests/\S+::\S+):\s*$", line.strip())
        if m:
            current = m.group(1)
        m = re.match(r"^\s*\* ([\d.]+)%, (.+)$", line)
        if m and current:
            events[current][m.group(2).strip()] = float(m.group(1))
    return events


def readme_entry_points() -> dict[str, list[str]]:
    """``{'jc.pruning.magnitude': [its keyword arguments], ...}`` from README's "Every transform" table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Every transform", 1)[1].split("\n## ", 1)[0]
    out: dict[str, list[str]] = {}
    full: list[str] = []  # '...' in a signature stands for the keywords of the last full one
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        prefix = ""
        for span in re.findall(r"`([^`]+\(.*?\))`", row.split(" | ")[0]):
            name, args = span.split("(", 1)
            if name.startswith("jc."):
                prefix = name.rsplit(".", 1)[0]
            else:
                name = f"{prefix}.{name}"
            params = [a.split("=")[0].strip() for a in args.rstrip(")").split(",")]
            named = [a for a in params if a and a not in ("*", "...")]
            if "..." in params:
                named += [a for a in full if a not in named]
            else:
                full = [a for a in named if a in args.split("*", 1)[-1]]
            out[name] = named
    return out


def fuzz_entry_points() -> dict[str, list[str]]:
    """``{test name: [entry points]}`` from the first line of each fuzz test's docstring."""
    out = {}
    for file in FUZZ_TESTS:
        out.update(_fuzz_entry_points(file))
    return out


def _fuzz_entry_points(file: str) -> dict[str, list[str]]:
    out = {}
    for node in ast.parse((ROOT / file).read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and (ast.get_docstring(node) or "").startswith("jc."):
            head = (ast.get_docstring(node) or "").split(":", 1)[0]
            names, prefix = [], ""
            for part in re.split(r",\s*|\s+and\s+", head):
                part = part.split(" (")[0].strip()
                if part.startswith("jc."):
                    prefix = part.rsplit(".", 1)[0]
                elif part:
                    part = f"{prefix}.{part.split()[-1]}"
                names.append(part)
            out[f"{file}::{node.name}"] = names
    return out


def cli_arguments() -> list[tuple[str, str, str]]:
    """``(command, option, accepted values)`` for every option of ``jcompress`` with a checking type."""
    sys.path.insert(0, str(ROOT))
    from jcompress import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    rows = []
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.type is not None and action.option_strings:
                doc = (action.type.__doc__ or action.type.__name__).strip().splitlines()[0]
                rows.append((command, action.option_strings[0], doc))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT / "TESTING.md"))
    args = p.parse_args()
    props = property_test_files()
    files = ["tests/test_validation.py", *CLI_TESTS, *FUZZ_TESTS, *[f for f in FAULT_TESTS if (ROOT / f).exists()], *props]
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        log = run_pytest(list(dict.fromkeys(files)), xml)
        res = outcomes(xml)
    examples = hypothesis_examples(log)
    events = hypothesis_events(log)

    lines = ["# Testing: bad inputs, injected faults and properties", "",
             ("Generated by `python scripts/testing_report.py` from the test suite's own results "
             "(JUnit XML and hypothesis statistics); do not edit by hand."), ""]  # fmt: skip
    by_kind = collections.defaultdict(lambda: collections.Counter())
    for name, outcome in res.items():
        m = re.search(r"test_bad_input\[(.+?): (.+)\]$", name)
        if m:
            by_kind[m.group(1)][outcome] += 1
    total = sum(sum(c.values()) for c in by_kind.values())
    lines += ["## Bad inputs", "",
              (f"{total} bad inputs of {len(by_kind)} kinds are passed to public entry points "
              "(tests/test_validation.py). *passed* means the call raised the expected exception type "
              "and its message names the argument or leaf and what is wrong."), "",
              "| kind | tried | passed | failed |", "|---|---|---|---|"]  # fmt: skip
    for kind, c in sorted(by_kind.items()):
        lines.append(f"| {kind} | {sum(c.values())} | {c['passed']} | {c['FAILED']} |")
    lines += ["", ("Other test files add their own bad-input checks next to each transform (for example "
              "tests/test_quant.py, tests/test_pruning_masks.py, tests/test_export.py); they are not counted here."), ""]  # fmt: skip

    lines += entry_point_section(res, examples, events)
    lines += cli_section(res)
    lines += fuzz_section(res, examples, events)

    lines += ["## Injected faults", "", "| fault | test | outcome |", "|---|---|---|"]
    for f, what in FAULT_TESTS.items():
        for name, outcome in sorted(res.items()):
            if name.startswith(f + "::"):
                lines.append(f"| {what} | `{name.split('::', 1)[1]}` | {outcome} |")
    lines += ["", ("What the fault tests require: the killed run restarts from the last complete checkpoint "
              "and ends bit-identical to an uninterrupted run; the surviving process of a distributed run "
              "exits with an error naming the dead task within 60 s (heartbeat timeout 5 s) instead of "
              "hanging; corrupt, truncated or foreign compressed files are refused with the file named."), ""]  # fmt: skip

    lines += ["## Property-based tests (hypothesis)", "", "| test | random examples | outcome |", "|---|---|---|"]
    for name, outcome in sorted(res.items()):
        if name in examples:
            lines.append(f"| `{name}` | {examples[name]} | {outcome} |")
    failed = [n for n, o in res.items() if o == "FAILED"]
    lines += ["", (f"Totals: {len(res)} tests run, {len(failed)} failed, "
              f"{sum(1 for o in res.values() if o == 'skipped')} skipped."), ""]  # fmt: skip
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}: {len(res)} tests, {len(failed)} failed")
    for name in failed:
        print(f"FAILED {name}")
    return 1 if failed else 0


def entry_point_section(res: dict, examples: dict, events: dict) -> list[str]:
    fuzzed = {}
    for test, names in fuzz_entry_points().items():
        args = sorted({e.split(":")[0] for e in events.get(test, {}) if e.endswith("invalid value")})
        inputs = sorted({e.split(":")[0] for e in events.get(test, {}) if e.startswith(("params: one", "stats: one"))})
        for n in names:
            fuzzed[n] = (test, args + inputs)
    lines = ["## Public entry points and their validated arguments", "",
             ("Every factory of README's \"Every transform\" table, with its arguments (from the README), the "
             "arguments and inputs the fuzz (tests/test_fuzz.py, tests/test_fuzz_models.py) gave invalid values, and how many random examples "
             "it ran. An entry point marked \"not fuzzed\" has its bad inputs in the table of tests/test_validation.py "
             "below."), "",
             "| entry point | arguments | fuzzed with invalid | examples | outcome |", "|---|---|---|---|---|"]  # fmt: skip
    for name, args in readme_entry_points().items():
        test, bad = fuzzed.get(name, (None, []))
        outcome = res.get(test, "not run") if test else "not fuzzed"
        count = examples.get(test, 0) if test else ""
        lines.append(f"| `{name}` | {', '.join(args)} | {', '.join(bad) or '-'} | {count} | {outcome} |")
    for name, (test, bad) in sorted(fuzzed.items()):
        if name not in readme_entry_points():
            lines.append(f"| `{name}` | | {', '.join(bad) or '-'} | {examples.get(test, 0)} | {res.get(test, 'not run')} |")
    return [*lines, ""]


def cli_section(res: dict) -> list[str]:
    tried = collections.Counter()
    for name, outcome in res.items():
        m = re.search(r"test_bad_number_exits_2_naming_the_argument\[(\S+) (\S+) .+\]$", name)
        if m:
            tried[(m.group(1), m.group(2), outcome)] += 1
    lines = ["## Command line", "",
             ("Every number a `jcompress` subcommand takes is checked by its argparse type before anything runs; a "
             "bad value exits with status 2 and one line naming the argument (tests/test_cli_validation.py)."), "",
             "| command | argument | accepted | bad values tried | passed |", "|---|---|---|---|---|"]  # fmt: skip
    for command, option, doc in cli_arguments():
        n = sum(c for (cmd, opt, _), c in tried.items() if cmd == command and opt == option)
        ok = sum(c for (cmd, opt, o), c in tried.items() if cmd == command and opt == option and o == "passed")
        lines.append(f"| {command} | `{option}` | {doc} | {n} | {ok} |")
    lines += ["", "Other command-line and TFDS checks:", "", "| test | outcome |", "|---|---|"]
    for name, outcome in sorted(res.items()):
        if name.startswith(tuple(CLI_TESTS)) and "test_bad_number_exits_2" not in name:
            lines.append(f"| `{name}` | {outcome} |")
    return [*lines, ""]


def fuzz_section(res: dict, examples: dict, events: dict) -> list[str]:
    lines = ["## Fuzz of the public transforms (tests/test_fuzz.py, tests/test_fuzz_models.py)", "",
             ("Random parameter trees (size-1 and empty dimensions; float16, bfloat16, float32; one leaf NaN, inf, "
             "integer or empty now and then) and hyperparameters from a valid and an invalid list. Each call must "
             "raise ValueError/TypeError naming the argument or the leaf, or return a result with the transform's "
             "invariants; a certainly invalid input must raise. The transforms that need a model or data "
             "(tests/test_fuzz_models.py) get random MLPs of one or two hidden layers of 1 to 6 units and must "
             "compute the same function as the reference (masked, truncated or dequantized model). Percentages are "
             "of the test's examples (hypothesis events); the budget is fixed (derandomize=True)."), ""]  # fmt: skip
    for test, names in fuzz_entry_points().items():
        lines += [f"### `{test.split('::')[1]}`: {', '.join(names)}", "",
                  f"{examples.get(test, 0)} examples, {res.get(test, 'not run')}.", "",
                  "| input or outcome | share of examples |", "|---|---|"]  # fmt: skip
        for event, pct in sorted(events.get(test, {}).items()):
            lines.append(f"| {event} | {pct:.0f}% |")
        lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
