"""mdistiller ``cifar/resnetv2.py``: the CIFAR ``ResNet18`` (student) and ``ResNet50``
(teacher), torchvision-style blocks on 32×32 inputs without max-pool (spec §2.2).

Naming differs from resnet.py: the projection is ``shortcut`` and the head ``linear``.
Init: kaiming normal fan_out convs, torch default Linear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L
from sortkd_jax.models.resnet_blocks import BasicBlock, Bottleneck, add_stages


class ResNetV2(nnx.Module):

  def __init__(self, block: type[nnx.Module], num_blocks: tuple[int, ...], num_classes: int,
               *, rngs: nnx.Rngs, dtype: L.Dtype = jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.dtype = dtype
    self.conv1 = L.conv(3, 64, 3, 1, kernel_init=L.normal_fan_out(), **kw)
    self.bn1 = L.BatchNorm(64, dtype=dtype)
    in_ch = add_stages(self, block, num_blocks, projection="shortcut", **kw)
    self.linear = L.classifier(in_ch, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = L.relu(self.bn1(self.conv1(L.model_input(x, self.dtype))))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return self.linear(L.global_avg_pool(x))


CONFIGS = {
    "ResNet18": (BasicBlock, (2, 2, 2, 2)),
    "ResNet50": (Bottleneck, (3, 4, 6, 3)),
}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs,
          dtype: L.Dtype = jnp.float32) -> ResNetV2:
  block, num_blocks = CONFIGS[name]
  return ResNetV2(block, num_blocks, num_classes, rngs=rngs, dtype=dtype)
