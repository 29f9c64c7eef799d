"""The residual blocks of mdistiller's ResNets (spec §2.1, §2.2, §3.1), shared by three files.

Post-activation: the shortcut is added before the last ReLU; a projection (1×1 conv, stride s,
then BN) replaces the identity when the stride or the width changes. The reference names the
projection `downsample` (cifar/resnet.py, imagenet/resnet.py) or `shortcut`
(cifar/resnetv2.py); the name is part of the state-dict key, hence the `projection` argument.
Convs are initialised normal(0, √(2/(k²·out))) in all three files.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L


def _set_projection(block: nnx.Module, name: str, in_ch: int, out_ch: int, stride: int, kw,
                    dtype) -> None:
  block.projection = name
  projection = None  # torch: absent, or an empty nn.Sequential with no keys
  if stride != 1 or in_ch != out_ch:
    projection = nnx.List([L.conv(in_ch, out_ch, 1, stride, **kw),
                           L.BatchNorm(out_ch, dtype=dtype)])
  setattr(block, name, projection)


def _add_shortcut(block: nnx.Module, out: jax.Array, x: jax.Array) -> jax.Array:
  projection = getattr(block, block.projection)
  if projection is not None:
    x = projection[1](projection[0](x))
  return L.relu(out + x)


class BasicBlock(nnx.Module):
  """conv3×3(stride)-BN-ReLU-conv3×3-BN, add the shortcut, ReLU."""
  expansion = 1

  def __init__(self, in_ch: int, planes: int, stride: int, *, projection: str = "downsample",
               rngs: nnx.Rngs, dtype: L.Dtype):
    kw = dict(kernel_init=L.normal_fan_out(), rngs=rngs, dtype=dtype)
    self.conv1 = L.conv(in_ch, planes, 3, stride, **kw)
    self.bn1 = L.BatchNorm(planes, dtype=dtype)
    self.conv2 = L.conv(planes, planes, 3, 1, **kw)
    self.bn2 = L.BatchNorm(planes, dtype=dtype)
    _set_projection(self, projection, in_ch, planes, stride, kw, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = L.relu(self.bn1(self.conv1(x)))
    return _add_shortcut(self, self.bn2(self.conv2(out)), x)


class Bottleneck(nnx.Module):
  """1×1 → 3×3 (the stride sits here) → 1×1 (×4 channels), add the shortcut, ReLU."""
  expansion = 4

  def __init__(self, in_ch: int, planes: int, stride: int, *, projection: str = "downsample",
               rngs: nnx.Rngs, dtype: L.Dtype):
    kw = dict(kernel_init=L.normal_fan_out(), rngs=rngs, dtype=dtype)
    out_ch = planes * self.expansion
    self.conv1 = L.conv(in_ch, planes, 1, 1, **kw)
    self.bn1 = L.BatchNorm(planes, dtype=dtype)
    self.conv2 = L.conv(planes, planes, 3, stride, **kw)
    self.bn2 = L.BatchNorm(planes, dtype=dtype)
    self.conv3 = L.conv(planes, out_ch, 1, 1, **kw)
    self.bn3 = L.BatchNorm(out_ch, dtype=dtype)
    _set_projection(self, projection, in_ch, out_ch, stride, kw, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = L.relu(self.bn1(self.conv1(x)))
    out = L.relu(self.bn2(self.conv2(out)))
    return _add_shortcut(self, self.bn3(self.conv3(out)), x)


def add_stages(net: nnx.Module, block: type[BasicBlock | Bottleneck], num_blocks: Sequence[int],
               *, projection: str = "downsample", rngs: nnx.Rngs, dtype: jnp.dtype) -> int:
  """Sets `net.layer1..layer4` (torchvision widths 64–512, strides 1, 2, 2, 2) from a stem of
  64 channels; returns the width the classifier sees."""
  in_ch = 64
  for s, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)),
                                          start=1):
    blocks = []
    for i in range(n):
      blocks.append(block(in_ch, planes, stride if i == 0 else 1, projection=projection,
                          rngs=rngs, dtype=dtype))
      in_ch = planes * block.expansion
    setattr(net, f"layer{s}", nnx.List(blocks))
  return in_ch
