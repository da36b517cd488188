"""Knowledge distillation: losses, a jitted data-parallel step, and a resumable driver.

* :mod:`jcompress.distill.losses`: Hinton's soft targets, logit MSE, FitNets hints,
  attention transfer, parameter distance.
* :mod:`jcompress.distill.step`: ``distill_step`` (pure), ``make_step`` (jit or
  shard_map over a ``'data'`` mesh), cached teacher logits, named activations.
* :mod:`jcompress.distill.run`: ``distill(teacher_dir, student_config, dataset, ...)``
  with checkpoints and metrics, ``demo_stage``, and the ``jcompress distill`` command.
"""

from jcompress.distill.losses import (
    HintonTerms,
    attention_map,
    attention_transfer_loss,
    hint_loss,
    hinton_loss,
    init_hint_regressor,
    kl_divergence,
    logit_mse,
    param_distance,
)
from jcompress.distill.run import DistillResult, demo_stage, distill, distill_model
from jcompress.distill.step import (
    DistillConfig,
    DistillState,
    distill_step,
    init_state,
    make_step,
    teacher_logits,
)

__all__ = [
    "DistillConfig",
    "DistillResult",
    "DistillState",
    "HintonTerms",
    "attention_map",
    "attention_transfer_loss",
    "demo_stage",
    "distill",
    "distill_model",
    "distill_step",
    "hint_loss",
    "hinton_loss",
    "init_hint_regressor",
    "init_state",
    "kl_divergence",
    "logit_mse",
    "make_step",
    "param_distance",
    "teacher_logits",
]
