"""LeNet-5 in the Caffe variant used by the pruning papers (Han et al. 2015)."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx


class LeNet5(nnx.Module):
    """conv1 (5x5, 20) -> max-pool 2 -> conv2 (5x5, 50) -> max-pool 2 -> fc1 (500) -> ReLU -> fc2.

    This is Caffe's ``lenet_train_test.prototxt``: VALID convolutions, no nonlinearity
    after the convolutions, 431,080 parameters on 28x28x1 inputs.

    Inputs ``(N, H, W, C)`` float32 (H = W = 28 for MNIST); output ``(N, num_classes)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (20, 50),
        hidden: int = 500,
        rngs: nnx.Rngs,
    ):
        h, w, c = (tuple(input_shape) + (1,))[:3] if len(input_shape) == 2 else tuple(input_shape)
        if h < 12 or w < 12:
            raise ValueError(f"LeNet5 needs inputs of at least 12x12 pixels, got input_shape={tuple(input_shape)}")
        self.channels = tuple(int(ch) for ch in channels)
        self.hidden_size = int(hidden)
        self.conv1 = nnx.Conv(c, self.channels[0], (5, 5), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(self.channels[0], self.channels[1], (5, 5), padding="VALID", rngs=rngs)
        oh, ow = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.fc1 = nnx.Linear(oh * ow * self.channels[1], self.hidden_size, rngs=rngs)
        self.fc2 = nnx.Linear(self.hidden_size, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        x = nnx.max_pool(self.conv1(x), (2, 2), strides=(2, 2))
        x = nnx.max_pool(self.conv2(x), (2, 2), strides=(2, 2))
        return x

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.features(x)
        x = x.reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(x)))
