"""mdistiller ``imagenet/resnet.py``: ``imagenet_ResNet18/34/50`` with torchvision's keys
(spec §3.1).

mdistiller applies each block's ReLU at the *next* block's input and once more before the
pool; that is value-identical to torchvision's post-activation blocks (ReLU is exact and
the first block's input is a max-pool of ReLUs), which is what runs here, so torchvision
weights load strictly and give the same logits. Stem 7×7/2 pad 3 → BN → ReLU → max-pool
3/2/1 (−∞ padding). Init: normal(0, √(2/(k²·out))) convs, torch default Linear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L


def _downsample(in_ch, out_ch, stride, kw, dtype):
  if stride != 1 or in_ch != out_ch:
    return nnx.List([L.conv(in_ch, out_ch, 1, stride, **kw), L.BatchNorm(out_ch, dtype=dtype)])
  return None


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_ch: int, planes: int, stride: int, *, rngs: nnx.Rngs, dtype):
    kw = dict(kernel_init=L.normal_fan_out(), rngs=rngs, dtype=dtype)
    self.conv1 = L.conv(in_ch, planes, 3, stride, **kw)
    self.bn1 = L.BatchNorm(planes, dtype=dtype)
    self.conv2 = L.conv(planes, planes, 3, 1, **kw)
    self.bn2 = L.BatchNorm(planes, dtype=dtype)
    self.downsample = _downsample(in_ch, planes, stride, kw, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = L.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      x = self.downsample[1](self.downsample[0](x))
    return L.relu(out + x)


class Bottleneck(nnx.Module):
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
    self.downsample = _downsample(in_ch, out_ch, stride, kw, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = L.relu(self.bn1(self.conv1(x)))
    out = L.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      x = self.downsample[1](self.downsample[0](x))
    return L.relu(out + x)


class ImageNetResNet(nnx.Module):

  def __init__(self, block, num_blocks, num_classes: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.dtype = dtype
    self.conv1 = L.conv(3, 64, 7, 2, kernel_init=L.normal_fan_out(), **kw)
    self.bn1 = L.BatchNorm(64, dtype=dtype)
    in_ch = 64
    for s, (planes, n, stride) in enumerate(
        zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), start=1):
      blocks = []
      for i in range(n):
        blocks.append(block(in_ch, planes, stride if i == 0 else 1, **kw))
        in_ch = planes * block.expansion
      setattr(self, f"layer{s}", nnx.List(blocks))
    self.fc = L.linear(in_ch, num_classes, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = L.relu(self.bn1(self.conv1(x.astype(self.dtype))))
    x = L.max_pool(x, 3, 2, 1)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return L.logits_f32(self.fc(L.global_avg_pool(x)))


CONFIGS = {
    "imagenet_ResNet18": (BasicBlock, (2, 2, 2, 2)),
    "imagenet_ResNet34": (BasicBlock, (3, 4, 6, 3)),
    "imagenet_ResNet50": (Bottleneck, (3, 4, 6, 3)),
}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> ImageNetResNet:
  block, num_blocks = CONFIGS[name]
  return ImageNetResNet(block, num_blocks, num_classes, rngs=rngs, dtype=dtype)
