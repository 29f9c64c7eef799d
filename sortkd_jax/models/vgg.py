"""mdistiller ``cifar/vgg.py``: vgg8/11/13/16/19, all batch-norm variants (spec §2.4).

Each ``blockB`` is a torch Sequential of [Conv3×3(+bias), BN, ReLU] units whose trailing
ReLU was removed, so conv j sits at index 3j and its BN at 3j+1; the forward applies the
ReLU after every BN anyway. Max-pool 2×2 after blocks 0–2; ``pool3`` only for 64-pixel
inputs (never on CIFAR); adaptive average pool to 1×1; ``classifier`` Linear(512, C).
Init: normal(0, √(2/(k²·out))) convs with zero bias; Linear normal(0, 0.01), zero bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L

_WIDTHS = (64, 128, 256, 512, 512)


class VGG(nnx.Module):

  def __init__(self, convs_per_block: tuple[int, ...], num_classes: int, *,
               rngs: nnx.Rngs, dtype: L.Dtype = jnp.float32):
    self.dtype = dtype
    in_ch = 3
    for b, (n, width) in enumerate(zip(convs_per_block, _WIDTHS)):
      entries = []
      for j in range(n):
        if j:
          entries.append(None)  # index 3j−1: the ReLU between units
        entries.append(L.conv(in_ch, width, 3, 1, bias=True, kernel_init=L.normal_fan_out(),
                              bias_init=L.zeros, rngs=rngs, dtype=dtype))
        entries.append(L.BatchNorm(width, dtype=dtype))
        in_ch = width
      setattr(self, f"block{b}", nnx.List(entries))
    self.classifier = L.classifier(512, num_classes, kernel_init=L.normal(0.01),
                               bias_init=L.zeros, rngs=rngs)

  @staticmethod
  def _block(block: nnx.List, x: jax.Array) -> jax.Array:
    for j in range(0, len(block), 3):
      x = L.relu(block[j + 1](block[j](x)))
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.shape[1]
    x = L.model_input(x, self.dtype)
    x = L.max_pool(self._block(self.block0, x), 2, 2)
    x = L.max_pool(self._block(self.block1, x), 2, 2)
    x = L.max_pool(self._block(self.block2, x), 2, 2)
    x = self._block(self.block3, x)
    if h == 64:
      x = L.max_pool(x, 2, 2)
    x = self._block(self.block4, x)
    return self.classifier(L.global_avg_pool(x))


CONFIGS = {
    "vgg8": (1, 1, 1, 1, 1),
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs,
          dtype: L.Dtype = jnp.float32) -> VGG:
  return VGG(CONFIGS[name], num_classes, rngs=rngs, dtype=dtype)
