"""mdistiller ``cifar/mobilenetv2.py``: ``MobileNetV2`` = ``mobile_half`` (T=6, width
0.5) (spec §2.5).

Unlike the reference MobileNetV2, the 1×1 expansion conv exists even when t=1. Torch
Sequentials keep their ReLU indices, hence ``conv.0, conv.1, conv.3, conv.4, conv.6,
conv.7`` (``None`` at 2 and 5). Stem stride 2 (32→16); head 1×1 conv to 1280, 2×2 average
pool (global at 32×32 input) and ``classifier.0``.
Init: normal(0, √(2/(k²·out))) convs (no bias); Linear normal(0, 0.01), zero bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L


class InvertedResidual(nnx.Module):

  def __init__(self, inp: int, oup: int, stride: int, expand: int, *, rngs: nnx.Rngs,
               dtype: L.Dtype):
    hidden = inp * expand
    kw = dict(kernel_init=L.normal_fan_out(), rngs=rngs, dtype=dtype)
    self.use_res_connect = stride == 1 and inp == oup
    self.conv = nnx.List([
        L.conv(inp, hidden, 1, 1, **kw), L.BatchNorm(hidden, dtype=dtype), None,
        L.conv(hidden, hidden, 3, stride, groups=hidden, **kw),
        L.BatchNorm(hidden, dtype=dtype), None,
        L.conv(hidden, oup, 1, 1, **kw), L.BatchNorm(oup, dtype=dtype),
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.conv
    h = L.relu(c[1](c[0](x)))
    h = L.relu(c[4](c[3](h)))
    h = c[7](c[6](h))  # linear bottleneck: no activation
    return x + h if self.use_res_connect else h


class MobileNetV2(nnx.Module):

  def __init__(self, num_classes: int, *, expansion: int = 6, width_mult: float = 0.5,
               rngs: nnx.Rngs, dtype: L.Dtype = jnp.float32):
    settings = [(1, 16, 1, 1), (expansion, 24, 2, 1), (expansion, 32, 3, 2),
                (expansion, 64, 4, 2), (expansion, 96, 3, 1), (expansion, 160, 3, 2),
                (expansion, 320, 1, 1)]
    kw = dict(kernel_init=L.normal_fan_out(), rngs=rngs, dtype=dtype)
    self.dtype = dtype
    in_ch = int(32 * width_mult)
    self.conv1 = nnx.List([L.conv(3, in_ch, 3, 2, **kw), L.BatchNorm(in_ch, dtype=dtype), None])
    stages = []
    for t, c, n, s in settings:
      out_ch = int(c * width_mult)
      blocks = []
      for i in range(n):
        blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t,
                                       rngs=rngs, dtype=dtype))
        in_ch = out_ch
      stages.append(nnx.List(blocks))
    self.blocks = nnx.List(stages)
    last = 1280  # int(1280·w) only when w > 1
    self.conv2 = nnx.List([L.conv(in_ch, last, 1, 1, **kw), L.BatchNorm(last, dtype=dtype), None])
    self.classifier = nnx.List([L.classifier(last, num_classes, kernel_init=L.normal(0.01),
                                         bias_init=L.zeros, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = L.relu(self.conv1[1](self.conv1[0](L.model_input(x, self.dtype))))
    for stage in self.blocks:
      for block in stage:
        x = block(x)
    x = L.relu(self.conv2[1](self.conv2[0](x)))
    return self.classifier[0](L.global_avg_pool(x))


CONFIGS = {"MobileNetV2": dict(expansion=6, width_mult=0.5)}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs,
          dtype: L.Dtype = jnp.float32) -> MobileNetV2:
  return MobileNetV2(num_classes, **CONFIGS[name], rngs=rngs, dtype=dtype)
