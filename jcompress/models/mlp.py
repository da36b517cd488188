"""Multilayer perceptrons: LeNet-300-100 and MLPs of any widths (Hinton's 1200-1200)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """A ReLU MLP with layers named ``fc1 ... fcK``; the last one gives the logits.

    Args:
      in_features: flattened input size (784 for 28x28 images).
      widths: hidden widths, e.g. ``(300, 100)`` for LeNet-300-100.
      num_classes: output size.
      dropout: dropout rate on hidden activations (Hinton et al. use 0.5).
      input_dropout: dropout rate on the inputs (Hinton et al. use 0.2).
      rngs: parameter initialisation keys.

    Inputs of any shape ``(N, ...)`` are flattened to ``(N, in_features)``; the output is
    ``(N, num_classes)`` float32 logits.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        num_classes: int,
        *,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        sizes = [int(in_features), *[int(w) for w in widths], int(num_classes)]
        self.widths = tuple(int(w) for w in widths)
        self.num_layers = len(sizes) - 1
        for i in range(self.num_layers):
            setattr(self, f"fc{i + 1}", nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs))
        for name, rate in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= float(rate) < 1.0:  # also false for NaN
                raise ValueError(f"{name}={rate} must be in [0, 1): the fraction of units dropped in training")
        self.dropout = nnx.Dropout(dropout)
        self.input_dropout = nnx.Dropout(input_dropout)

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x = self.input_dropout(x, deterministic=not train, rngs=rngs)
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = jax.nn.relu(x)
                x = self.dropout(x, deterministic=not train, rngs=rngs)
        return x

    def hidden(self, x: jax.Array) -> list[jax.Array]:
        """Post-ReLU activations of every hidden layer (eval mode), for neuron statistics."""
        x = x.reshape(x.shape[0], -1)
        acts = []
        for i in range(1, self.num_layers):
            x = jax.nn.relu(getattr(self, f"fc{i}")(x))
            acts.append(x)
        return acts


def lenet300(in_features: int = 784, num_classes: int = 10, *, rngs: nnx.Rngs, **kw) -> MLP:
    """LeNet-300-100 (266,610 parameters on 28x28 inputs) as in Han et al. 2015."""
    return MLP(in_features, (300, 100), num_classes, rngs=rngs, **kw)


def flat_size(input_shape: Sequence[int]) -> int:
    return int(jnp.prod(jnp.array(input_shape)))
