"""mdistiller ``imagenet/mobilenetv1.py``: ``imagenet_MobileNetV1`` (spec §3.2).

``model`` is a torch Sequential of 15 entries: ``model.0`` conv_bn (3×3/2, 3→32),
``model.1``–``model.13`` conv_dw (depthwise 3×3 → BN → ReLU → 1×1 → BN → ReLU, keys at
0, 1, 3, 4), ``model.14`` AvgPool2d(7) (no keys; global mean at 224 input); then ``fc``.
mdistiller hard-codes 1000 classes; ``num_classes`` is honoured here for other heads.
Init: PyTorch defaults.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import layers as L

_DW = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
       (256, 512, 2), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
       (512, 512, 1), (512, 1024, 2), (1024, 1024, 1))


class MobileNetV1(nnx.Module):

  def __init__(self, num_classes: int, *, rngs: nnx.Rngs, dtype: L.Dtype = jnp.float32):
    kw = dict(kernel_init=L.torch_default_kernel(), rngs=rngs, dtype=dtype)
    self.dtype = dtype
    entries = [nnx.List([L.conv(3, 32, 3, 2, **kw), L.BatchNorm(32, dtype=dtype), None])]
    for inp, oup, s in _DW:
      entries.append(nnx.List([
          L.conv(inp, inp, 3, s, groups=inp, **kw), L.BatchNorm(inp, dtype=dtype), None,
          L.conv(inp, oup, 1, 1, **kw), L.BatchNorm(oup, dtype=dtype), None,
      ]))
    entries.append(None)  # model.14: AvgPool2d(7)
    self.model = nnx.List(entries)
    self.fc = L.classifier(1024, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = L.model_input(x, self.dtype)
    for unit in self.model[:14]:
      for j in range(0, len(unit), 3):
        x = L.relu(unit[j + 1](unit[j](x)))
    return self.fc(L.global_avg_pool(x))


CONFIGS = {"imagenet_MobileNetV1": {}}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs,
          dtype: L.Dtype = jnp.float32) -> MobileNetV1:
  return MobileNetV1(num_classes, rngs=rngs, dtype=dtype)
