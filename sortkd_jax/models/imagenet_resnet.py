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
from sortkd_jax.models.resnet_blocks import BasicBlock, Bottleneck, add_stages


class ImageNetResNet(nnx.Module):

  def __init__(self, block: type[nnx.Module], num_blocks: tuple[int, ...], num_classes: int,
               *, rngs: nnx.Rngs, dtype: L.Dtype = jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.dtype = dtype
    self.conv1 = L.conv(3, 64, 7, 2, kernel_init=L.normal_fan_out(), **kw)
    self.bn1 = L.BatchNorm(64, dtype=dtype)
    in_ch = add_stages(self, block, num_blocks, **kw)
    self.fc = L.classifier(in_ch, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = L.relu(self.bn1(self.conv1(L.model_input(x, self.dtype))))
    x = L.max_pool(x, 3, 2, 1)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return self.fc(L.global_avg_pool(x))


CONFIGS = {
    "imagenet_ResNet18": (BasicBlock, (2, 2, 2, 2)),
    "imagenet_ResNet34": (BasicBlock, (3, 4, 6, 3)),
    "imagenet_ResNet50": (Bottleneck, (3, 4, 6, 3)),
}


def build(name: str, num_classes: int, *, rngs: nnx.Rngs,
          dtype: L.Dtype = jnp.float32) -> ImageNetResNet:
  block, num_blocks = CONFIGS[name]
  return ImageNetResNet(block, num_blocks, num_classes, rngs=rngs, dtype=dtype)
