"""mdistiller ``cifar/resnet.py``: post-activation CIFAR ResNets (spec §2.1).

resnet8/14/20/32/44/56/110 (widths 16,16,32,64) and resnet8x4/32x4 (32,64,128,256; their
``layer1.0`` has a ``downsample`` because 32≠64). Init: kaiming normal fan_out for convs,
torch default for the ``fc`` Linear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L
from sortkd_jax.models.resnet_blocks import BasicBlock


class CifarResNet(nnx.Module):

  def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int,
               *, rngs: nnx.Rngs, dtype: L.Dtype = jnp.float32):
    assert (depth - 2) % 6 == 0, depth
    n = (depth - 2) // 6
    kw = dict(rngs=rngs, dtype=dtype)
    self.dtype = dtype
    self.conv1 = L.conv(3, widths[0], 3, 1, kernel_init=L.normal_fan_out(), **kw)
    self.bn1 = L.BatchNorm(widths[0], dtype=dtype)
    in_ch = widths[0]
    for s, (out_ch, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
      blocks = []
      for i in range(n):
        blocks.append(BasicBlock(in_ch, out_ch, stride if i == 0 else 1, **kw))
        in_ch = out_ch
      setattr(self, f"layer{s}", nnx.List(blocks))
    self.fc = L.classifier(in_ch, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = L.relu(self.bn1(self.conv1(L.model_input(x, self.dtype))))
    for stage in (self.layer1, self.layer2, self.layer3):
      for block in stage:
        x = block(x)
    return self.fc(L.global_avg_pool(x))


_WIDTHS = (16, 16, 32, 64)
_WIDTHS_X4 = (32, 64, 128, 256)

# name -> (depth, widths)
CONFIGS = {
    "resnet8": (8, _WIDTHS),
    "resnet14": (14, _WIDTHS),
    "resnet20": (20, _WIDTHS),
    "resnet32": (32, _WIDTHS),
    "resnet44": (44, _WIDTHS),
    "resnet56": (56, _WIDTHS),
    "resnet110": (110, _WIDTHS),
    "resnet8x4": (8, _WIDTHS_X4),
    "resnet32x4": (32, _WIDTHS_X4),
}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs,
          dtype: L.Dtype = jnp.float32) -> CifarResNet:
  depth, widths = CONFIGS[name]
  return CifarResNet(depth, widths, num_classes, rngs=rngs, dtype=dtype)
