"""Resuming a run directory: the saved settings must match the command line.

``jcompress train`` and ``jcompress distill`` save the settings of their command line
(model, widths, data, learning rate, seed, ...) in the metadata of every checkpoint. When
``--out`` already holds a checkpoint, the run resumes from it only if the settings are the
same; otherwise the command stops and names the differing fields, unless ``--override``
is given, in which case the run continues with the new settings and the change is recorded
in the checkpoint metadata under ``overrides`` and appended to ``out/overrides.jsonl`` (at
once, so a finished run that trains no further epoch still records it). The number of epochs may always change (it
is how a finished run is extended).

Example:
  $ jcompress train --data digits --epochs 2 --out runs/a
  $ jcompress train --data digits --epochs 4 --lr 0.01 --out runs/a
  jcompress train: error: runs/a holds a run with other settings (lr: saved 0.001, given 0.01); ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["run_meta"]


def _saved_meta(ckpt: Path) -> tuple[int | None, dict]:
    if not ckpt.is_dir():
        return None, {}
    from jcompress import checkpoint

    ck = checkpoint.Checkpointer(ckpt)
    try:
        step = ck.latest_step()
        return step, (ck.read_meta(step) if step is not None else {})
    finally:
        ck.close()


def run_meta(out: Path, kind: str, settings: dict[str, Any], *, override: bool) -> dict[str, Any]:
    """The metadata to save with a run in ``out``, after checking it against a saved run there.

    Args:
      out: the run directory (``out/ckpt`` holds the checkpoints).
      kind: ``'train'`` or ``'distill'`` (the command); a run of another kind is never resumed.
      settings: the command line's settings, JSON values (lists, not tuples); ``epochs``
        is not one of them.
      override: resume even when the settings differ, recording the change.

    Returns:
      ``{'settings': settings}``, plus ``'overrides'``: the saved list of overrides with
      this one appended (``{'epoch', 'changed': {field: {'saved', 'given'}}}``) when a
      differing run is resumed with ``override``.

    Raises:
      ValueError: when ``out`` holds a run of another kind, or with other settings and no
        ``override``; the message names each differing field with both values.
    """
    step, saved = _saved_meta(Path(out) / "ckpt")
    meta: dict[str, Any] = {"settings": settings}
    if step is None:
        return meta
    saved_kind = saved.get("kind")
    if saved_kind is not None and saved_kind != kind:
        raise ValueError(f"{out} holds a 'jcompress {saved_kind}' run, not a {kind} run; give another --out directory")
    old = saved.get("settings")
    if old is None and not override:
        raise ValueError(
            f"{out} holds a checkpoint without recorded settings, so resuming it cannot be checked; give "
            "another --out directory, or --override to resume it with these settings"
        )
    old = old or {}
    changed = {
        k: {"saved": old.get(k), "given": settings.get(k)}
        for k in sorted(set(old) | set(settings))
        if old.get(k) != settings.get(k)
    }
    if changed and not override:
        fields = "; ".join(f"{k}: saved {v['saved']!r}, given {v['given']!r}" for k, v in changed.items())
        raise ValueError(
            f"{out} holds a run with other settings ({fields}); give the same settings to resume it, another "
            "--out directory for a new run, or --override to resume with the new settings (recorded in the "
            "checkpoint's metadata)"
        )
    overrides = list(saved.get("overrides", []))
    if changed:
        record = {"epoch": saved.get("epoch"), "changed": changed}
        overrides.append(record)
        # Also logged beside the checkpoints at once: a run whose epochs are all done saves
        # no new checkpoint, and the override must not go unrecorded.
        with open(Path(out) / "overrides.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    if overrides:
        meta["overrides"] = overrides
    return meta
