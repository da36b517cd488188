"""A small ResNet-style CNN with BatchNorm, for structured-pruning experiments."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus identity (or 1x1 projection), then ReLU."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, mid, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(mid, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(mid, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        needs_proj = stride != 1 or cin != cout
        self.proj = nnx.data(nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs) if needs_proj else None)

    def __call__(self, x, *, train: bool):
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = self.bn2(self.conv2(y), use_running_average=not train)
        skip = x if self.proj is None else self.proj(x)
        return jax.nn.relu(y + skip)


class ResNet(nnx.Module):
    """stem conv3x3-BN-ReLU, one residual block per stage, global average pool, fc.

    ``widths`` gives each stage's channels; stages after the first halve the resolution.
    Inputs ``(N, H, W, C)``; output ``(N, num_classes)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        widths: Sequence[int] = (16, 32, 64),
        rngs: nnx.Rngs,
    ):
        c = input_shape[-1] if len(input_shape) == 3 else 1
        self.widths = tuple(int(w) for w in widths)
        self.stem = nnx.Conv(c, self.widths[0], (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(self.widths[0], momentum=0.9, rngs=rngs)
        cin = self.widths[0]
        self.blocks = nnx.List()
        for i, w in enumerate(self.widths):
            self.blocks.append(Block(cin, w, w, 1 if i == 0 else 2, rngs=rngs))
            cin = w
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        for block in self.blocks:
            x = block(x, train=train)
        return self.fc(jnp.mean(x, axis=(1, 2)))
