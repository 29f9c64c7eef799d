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


def _shortcut(in_ch, out_ch, stride, kw, dtype):
  if stride != 1 or in_ch != out_ch:
    return nnx.List([L.conv(in_ch, out_ch, 1, stride, **kw), L.BatchNorm(out_ch, dtype=dtype)])
  return None  # torch: empty nn.Sequential, no keys


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_ch: int, planes: int, stride: int, *, rngs: nnx.Rngs, dtype):
    kw = dict(kernel_init=L.normal_fan_out(), rngs=rngs, dtype=dtype)
    self.conv1 = L.conv(in_ch, planes, 3, stride, **kw)
    self.bn1 = L.BatchNorm(planes, dtype=dtype)
    self.conv2 = L.conv(planes, planes, 3, 1, **kw)
    self.bn2 = L.BatchNorm(planes, dtype=dtype)
    self.shortcut = _shortcut(in_ch, planes, stride, kw, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = L.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.shortcut is not None:
      x = self.shortcut[1](self.shortcut[0](x))
    return L.relu(out + x)


class Bottleneck(nnx.Module):
  """1×1 → 3×3 (stride here) → 1×1 (×4), add, ReLU."""
  expansion = 4

  def __init__(self, in_ch: int, planes: int, stride: int, *, rngs: nnx.Rngs, dtype):
    kw = dict(kernel_init=L.normal_fan_out(), rngs=rngs, dtype=dtype)
    out_ch = planes * self.expansion
    self.conv1 = L.conv(in_ch, planes, 1, 1, **kw)
    self.bn1 = L.BatchNorm(planes, dtype=dtype)
    self.conv2 = L.conv(planes, planes, 3, stride, **kw)
    self.bn2 = L.BatchNorm(planes, dtype=dtype)
    self.conv3 = L.conv(planes, out_ch, 1, 1, **kw)
    self.bn3 = L.BatchNorm(out_ch, dtype=dtype)
    self.shortcut = _shortcut(in_ch, out_ch, stride, kw, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = L.relu(self.bn1(self.conv1(x)))
    out = L.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.shortcut is not None:
      x = self.shortcut[1](self.shortcut[0](x))
    return L.relu(out + x)


class ResNetV2(nnx.Module):

  def __init__(self, block, num_blocks, num_classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.dtype = dtype
    self.conv1 = L.conv(3, 64, 3, 1, kernel_init=L.normal_fan_out(), **kw)
    self.bn1 = L.BatchNorm(64, dtype=dtype)
    in_ch = 64
    for s, (planes, n, stride) in enumerate(
        zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), start=1):
      blocks = []
      for i in range(n):
        blocks.append(block(in_ch, planes, stride if i == 0 else 1, **kw))
        in_ch = planes * block.expansion
      setattr(self, f"layer{s}", nnx.List(blocks))
    self.linear = L.linear(in_ch, num_classes, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = L.relu(self.bn1(self.conv1(x.astype(self.dtype))))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return L.logits_f32(self.linear(L.global_avg_pool(x)))


CONFIGS = {
    "ResNet18": (BasicBlock, (2, 2, 2, 2)),
    "ResNet50": (Bottleneck, (3, 4, 6, 3)),
}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> ResNetV2:
  block, num_blocks = CONFIGS[name]
  return ResNetV2(block, num_blocks, num_classes, rngs=rngs, dtype=dtype)
