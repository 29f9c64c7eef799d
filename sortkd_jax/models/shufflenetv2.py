"""mdistiller ``cifar/ShuffleNetv2.py``: ``ShuffleV2`` (net_size 1: 116/232/464, head
1024; blocks 3/7/3 after each DownBlock) (spec §2.7).

BasicBlock: split channels at c = C/2 into [x1, x2]; the branch runs on x2
(1×1-BN-ReLU, depthwise 3×3-BN, 1×1-BN-ReLU); output shuffle₂(concat[x1, branch]).
DownBlock: left = depthwise 3×3/2-BN, 1×1-BN-ReLU; right = 1×1-BN-ReLU, depthwise
3×3/2-BN, 1×1-BN-ReLU; output shuffle₂(concat[left, right]). Init: PyTorch defaults.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L


def _kw(rngs, dtype):
  return dict(kernel_init=L.torch_default_kernel(), rngs=rngs, dtype=dtype)


class BasicBlock(nnx.Module):

  def __init__(self, channels: int, *, split_ratio: float = 0.5, rngs: nnx.Rngs, dtype: L.Dtype):
    c = int(channels * split_ratio)
    kw = _kw(rngs, dtype)
    self.split = c
    self.conv1 = L.conv(c, c, 1, 1, **kw)
    self.bn1 = L.BatchNorm(c, dtype=dtype)
    self.conv2 = L.conv(c, c, 3, 1, groups=c, **kw)
    self.bn2 = L.BatchNorm(c, dtype=dtype)
    self.conv3 = L.conv(c, c, 1, 1, **kw)
    self.bn3 = L.BatchNorm(c, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x1, x2 = x[..., :self.split], x[..., self.split:]
    out = L.relu(self.bn1(self.conv1(x2)))
    out = self.bn2(self.conv2(out))
    out = L.relu(self.bn3(self.conv3(out)))
    return L.channel_shuffle(jnp.concatenate([x1, out], axis=-1), 2)


class DownBlock(nnx.Module):

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype: L.Dtype):
    mid = out_ch // 2
    kw = _kw(rngs, dtype)
    self.conv1 = L.conv(in_ch, in_ch, 3, 2, groups=in_ch, **kw)
    self.bn1 = L.BatchNorm(in_ch, dtype=dtype)
    self.conv2 = L.conv(in_ch, mid, 1, 1, **kw)
    self.bn2 = L.BatchNorm(mid, dtype=dtype)
    self.conv3 = L.conv(in_ch, mid, 1, 1, **kw)
    self.bn3 = L.BatchNorm(mid, dtype=dtype)
    self.conv4 = L.conv(mid, mid, 3, 2, groups=mid, **kw)
    self.bn4 = L.BatchNorm(mid, dtype=dtype)
    self.conv5 = L.conv(mid, mid, 1, 1, **kw)
    self.bn5 = L.BatchNorm(mid, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    left = self.bn1(self.conv1(x))
    left = L.relu(self.bn2(self.conv2(left)))
    right = L.relu(self.bn3(self.conv3(x)))
    right = self.bn4(self.conv4(right))
    right = L.relu(self.bn5(self.conv5(right)))
    return L.channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nnx.Module):

  def __init__(self, out_channels: tuple[int, ...], num_blocks: tuple[int, ...],
               num_classes: int, *, rngs: nnx.Rngs,
               dtype: L.Dtype = jnp.float32):
    kw = _kw(rngs, dtype)
    self.dtype = dtype
    self.conv1 = L.conv(3, 24, 1, 1, **kw)
    self.bn1 = L.BatchNorm(24, dtype=dtype)
    in_ch = 24
    for s, (out_ch, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
      blocks = [DownBlock(in_ch, out_ch, rngs=rngs, dtype=dtype)]
      blocks += [BasicBlock(out_ch, rngs=rngs, dtype=dtype) for _ in range(n)]
      setattr(self, f"layer{s}", nnx.List(blocks))
      in_ch = out_ch
    self.conv2 = L.conv(in_ch, out_channels[3], 1, 1, **kw)
    self.bn2 = L.BatchNorm(out_channels[3], dtype=dtype)
    self.linear = L.classifier(out_channels[3], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = L.relu(self.bn1(self.conv1(L.model_input(x, self.dtype))))
    for stage in (self.layer1, self.layer2, self.layer3):
      for block in stage:
        x = block(x)
    x = L.relu(self.bn2(self.conv2(x)))
    return self.linear(L.global_avg_pool(x))


CONFIGS = {"ShuffleV2": dict(out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3))}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs,
          dtype: L.Dtype = jnp.float32) -> ShuffleNetV2:
  return ShuffleNetV2(**CONFIGS[name], num_classes=num_classes, rngs=rngs, dtype=dtype)
