"""mdistiller ``cifar/ShuffleNetv1.py``: ``ShuffleV1`` (g=3, stages 240/480/960, blocks
4/8/4) (spec §2.6).

Bottleneck: grouped 1×1 (groups 1 when the input is the 24-channel stem, else 3) → BN →
ReLU → channel shuffle → depthwise 3×3 → BN → ReLU → grouped 1×1 (groups 3) → BN; stride-2
blocks concatenate [branch, AvgPool(3,2,1, count_include_pad) of the input] (branch
first), the others add the input; ReLU after. Init: PyTorch defaults.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L


class Bottleneck(nnx.Module):

  def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, *,
               rngs: nnx.Rngs, dtype: L.Dtype):
    mid = int(out_ch / 4)
    g1 = 1 if in_ch == 24 else groups
    kw = dict(kernel_init=L.torch_default_kernel(), rngs=rngs, dtype=dtype)
    self.stride = stride
    self.shuffle_groups = g1
    self.conv1 = L.conv(in_ch, mid, 1, 1, groups=g1, **kw)
    self.bn1 = L.BatchNorm(mid, dtype=dtype)
    self.conv2 = L.conv(mid, mid, 3, stride, groups=mid, **kw)
    self.bn2 = L.BatchNorm(mid, dtype=dtype)
    self.conv3 = L.conv(mid, out_ch, 1, 1, groups=groups, **kw)
    self.bn3 = L.BatchNorm(out_ch, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = L.relu(self.bn1(self.conv1(x)))
    out = L.channel_shuffle(out, self.shuffle_groups)
    out = L.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.stride == 2:
      out = jnp.concatenate([out, L.avg_pool(x, 3, 2, 1)], axis=-1)
    else:
      out = out + x
    return L.relu(out)


class ShuffleNetV1(nnx.Module):

  def __init__(self, out_planes: tuple[int, ...], num_blocks: tuple[int, ...], groups: int,
               num_classes: int, *, rngs: nnx.Rngs, dtype: L.Dtype = jnp.float32):
    self.dtype = dtype
    self.conv1 = L.conv(3, 24, 1, 1, kernel_init=L.torch_default_kernel(), rngs=rngs,
                        dtype=dtype)
    self.bn1 = L.BatchNorm(24, dtype=dtype)
    in_ch = 24
    for s, (out_ch, n) in enumerate(zip(out_planes, num_blocks), start=1):
      blocks = []
      for i in range(n):
        stride = 2 if i == 0 else 1
        cat = in_ch if i == 0 else 0  # the pooled shortcut supplies in_ch channels
        blocks.append(Bottleneck(in_ch, out_ch - cat, stride, groups, rngs=rngs, dtype=dtype))
        in_ch = out_ch
      setattr(self, f"layer{s}", nnx.List(blocks))
    self.linear = L.classifier(in_ch, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = L.relu(self.bn1(self.conv1(L.model_input(x, self.dtype))))
    for stage in (self.layer1, self.layer2, self.layer3):
      for block in stage:
        x = block(x)
    return self.linear(L.global_avg_pool(x))


CONFIGS = {"ShuffleV1": dict(out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3)}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs,
          dtype: L.Dtype = jnp.float32) -> ShuffleNetV1:
  return ShuffleNetV1(**CONFIGS[name], num_classes=num_classes, rngs=rngs, dtype=dtype)
