"""Checkpoints with orbax-checkpoint: atomic saves of any train state plus JSON metadata.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed in the middle of a save leaves the previous checkpoint intact and the
half-written one is ignored on restore.

A *model checkpoint* additionally records how to rebuild the NNX model (registry name,
input shape, number of classes, constructor arguments), so ``load_model(dir,
build=models.from_meta)`` gives a ready model; the CLI passes such directories around
(``--teacher CKPT``). This module never imports the model zoo: the caller's ``build``
makes the model to restore into, so a user's own NNX model checkpoints the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jcompress import tree

__all__ = ["Checkpointer", "latest_step", "load_model", "save_model"]


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` keeping the last ``max_to_keep`` steps."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, items: dict[str, Any], meta: dict | None = None) -> None:
        """Save named pytrees (e.g. ``{'state': ..., 'model': ...}``) and JSON ``meta`` at ``step``."""
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        if meta is not None:
            args["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(int(step), args=ocp.args.Composite(**args))
        self.manager.wait_until_finished()

    def restore(self, targets: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], dict]:
        """Restore the named items into the structures (and shardings) of ``targets``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = {
            k: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, v)) for k, v in targets.items()
        }
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        except Exception as e:
            raise ValueError(
                f"checkpoint {self.directory} step {step} could not be restored into the given structure "
                f"({type(e).__name__}: {e}). Was it written by a different model or optimizer, or is it corrupt?"
            ) from e
        return {k: out[k] for k in targets}, dict(out["meta"] or {})

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except ValueError as e:  # json.JSONDecodeError among them
            raise ValueError(
                f"checkpoint {self.directory} step {step}: its metadata ({self.directory / str(step) / 'meta'}) "
                f"cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt. Delete step {step} to "
                "fall back to the one before it, or start a new run"
            ) from e
        return dict(out["meta"] or {})

    def close(self) -> None:
        self.manager.close()


def latest_step(directory: str | Path) -> int | None:
    d = Path(directory)
    if not d.exists():
        return None
    with ocp.CheckpointManager(d.absolute()) as m:
        return m.latest_step()


def save_model(directory: str | Path, config: dict, params: Any, extra: Any, *, step: int = 0, meta=None) -> None:
    """Save ``params``/``extra`` with the model ``config`` (the arguments of ``models.create``)."""
    ck = Checkpointer(directory)
    ck.save(step, {"model": {"params": params, "extra": extra}}, {"model": config, **(meta or {})})
    ck.close()


def load_model(directory: str | Path, step: int | None = None, *, build: Callable[[dict], nnx.Module]):
    """Rebuild the NNX model saved by :func:`save_model` or by ``train.fit``.

    Args:
      directory: the checkpoint directory.
      step: the step to load (default: the latest).
      build: ``build(meta) -> nnx.Module`` making the model to restore into from the saved
        metadata: ``jcompress.models.from_meta`` for the registered models
        (``models.create(**meta['model'])``), ``jcompress.nnx.factorize.rebuild`` for
        factorised ones, ``jcompress.nnx.surgery.resize`` for hard-pruned ones, or your own
        factory; it may raise ValueError when the metadata lacks what it needs.

    Returns:
      ``(model, config, meta)``: the NNX model holding the saved params (``nnx.Param``
      leaves) and extra state (everything else), its config dict (``meta['model']``) and
      the whole metadata.

    Example:
      >>> model, config, meta = checkpoint.load_model('runs/lenet300/ckpt', build=models.from_meta)
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    ck = Checkpointer(d)
    try:
        meta = ck.read_meta(step)
        if "model" not in meta:
            raise ValueError(f"{d} holds no model config; it was not written by jcompress save_model or fit")
        graphdef, params, extra = nnx.split(build(meta), nnx.Param, ...)
        target = {"params": nnx.to_pure_dict(params), "extra": nnx.to_pure_dict(extra)}
        out, _ = ck.restore({"model": target}, step)
    finally:
        ck.close()
    saved = jax.tree.map(np.asarray, out["model"])
    model = nnx.merge(
        graphdef, tree.from_pure_dict(params, saved["params"]), tree.from_pure_dict(extra, saved["extra"])
    )
    return model, meta["model"], meta
