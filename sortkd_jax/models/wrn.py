"""mdistiller ``cifar/wrn.py``: pre-activation Wide ResNets wrn_16_1/16_2/40_1/40_2
(spec §2.3).

Quirks kept on purpose:
* no BN/ReLU after the stem conv; no ReLU after the residual add;
* when in≠out, ``convShortcut`` (1×1, no BN) is applied to the *activated* input;
* the double running-stat update of ``block2.layer.0.bn1``, ``block3.layer.0.bn1`` and
  the head ``bn1`` in training (spec §2.3: mdistiller re-runs them for ``preact_feats``),
  i.e. running ← 0.81·running + 0.19·batch. It changes no logit, but changes the running
  statistics and hence a trained model's eval accuracy. Implemented with
  ``BatchNorm(stat_updates=2)``.
Init: normal(0, √(2/(k²·out))) convs, torch default Linear weight with zero bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L


class BasicBlock(nnx.Module):

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, bn1_stat_updates: int = 1,
               rngs: nnx.Rngs, dtype: L.Dtype):
    kw = dict(kernel_init=L.normal_fan_out(), rngs=rngs, dtype=dtype)
    self.bn1 = L.BatchNorm(in_ch, stat_updates=bn1_stat_updates, dtype=dtype)
    self.conv1 = L.conv(in_ch, out_ch, 3, stride, **kw)
    self.bn2 = L.BatchNorm(out_ch, dtype=dtype)
    self.conv2 = L.conv(out_ch, out_ch, 3, 1, **kw)
    self.equal_in_out = in_ch == out_ch
    self.convShortcut = None if self.equal_in_out else L.conv(in_ch, out_ch, 1, stride, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    a = L.relu(self.bn1(x))
    h = self.conv2(L.relu(self.bn2(self.conv1(a))))
    return (x if self.equal_in_out else self.convShortcut(a)) + h


class NetworkBlock(nnx.Module):
  """Holds its blocks in ``.layer`` (torch keys ``blockS.layer.i.*``)."""

  def __init__(self, n: int, in_ch: int, out_ch: int, stride: int, *,
               first_bn1_stat_updates: int = 1, rngs: nnx.Rngs, dtype: L.Dtype):
    self.layer = nnx.List([
        BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1,
                   bn1_stat_updates=first_bn1_stat_updates if i == 0 else 1,
                   rngs=rngs, dtype=dtype)
        for i in range(n)
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.layer:
      x = block(x)
    return x


class WideResNet(nnx.Module):

  def __init__(self, depth: int, widen: int, num_classes: int, *, rngs: nnx.Rngs,
               dtype: L.Dtype = jnp.float32):
    assert (depth - 4) % 6 == 0, depth
    n = (depth - 4) // 6
    w = (16, 16 * widen, 32 * widen, 64 * widen)
    kw = dict(rngs=rngs, dtype=dtype)
    self.dtype = dtype
    self.conv1 = L.conv(3, w[0], 3, 1, kernel_init=L.normal_fan_out(), **kw)
    self.block1 = NetworkBlock(n, w[0], w[1], 1, **kw)
    # The two re-run BNs of mdistiller's preact_feats (spec §2.3 quirk).
    self.block2 = NetworkBlock(n, w[1], w[2], 2, first_bn1_stat_updates=2, **kw)
    self.block3 = NetworkBlock(n, w[2], w[3], 2, first_bn1_stat_updates=2, **kw)
    self.bn1 = L.BatchNorm(w[3], stat_updates=2, dtype=dtype)
    self.fc = L.classifier(w[3], num_classes, bias_init=L.zeros, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv1(L.model_input(x, self.dtype))
    x = self.block3(self.block2(self.block1(x)))
    x = L.relu(self.bn1(x))
    return self.fc(L.global_avg_pool(x))


CONFIGS = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs,
          dtype: L.Dtype = jnp.float32) -> WideResNet:
  depth, widen = CONFIGS[name]
  return WideResNet(depth, widen, num_classes, rngs=rngs, dtype=dtype)
