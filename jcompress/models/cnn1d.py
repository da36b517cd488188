"""A 1-D CNN for MNIST-1D (the mnist1d repository's ConvBase reaches about 94%)."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx


class CNN1D(nnx.Module):
    """Three strided 1-D convolutions (kernel 5, stride 2) with ReLU, then a linear layer.

    Inputs ``(N, L)`` or ``(N, L, 1)`` float32 (L = 40 for MNIST-1D); output
    ``(N, num_classes)``.
    """

    def __init__(
        self,
        length: int = 40,
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (32, 32, 32),
        rngs: nnx.Rngs,
    ):
        self.channels = tuple(int(c) for c in channels)
        cin = 1
        n = int(length)
        for i, cout in enumerate(self.channels):
            setattr(self, f"conv{i + 1}", nnx.Conv(cin, cout, (5,), strides=(2,), padding=[(1, 1)], rngs=rngs))
            cin = cout
            n = (n + 2 - 5) // 2 + 1
        self.fc = nnx.Linear(n * cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]
        for i in range(len(self.channels)):
            x = jax.nn.relu(getattr(self, f"conv{i + 1}")(x))
        return self.fc(x.reshape(x.shape[0], -1))
