"""On-device image augmentation and normalisation (pure JAX; called inside the jitted dispatch).

CIFAR lives on the device as uint8, so mdistiller's train transform (spec §7.3: RandomCrop(32,
padding=4) with black padding -> RandomHorizontalFlip(0.5) -> ToTensor -> Normalize) runs here,
driven by a PRNG key, with no host round trip. ImageNet batches arrive cropped as uint8 from
tf.data (`imagenet_input`) and only need `normalize`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Spec §7.3 (mdistiller `dataset/cifar100.py` and `dataset/imagenet.py`).
CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What each pipeline (config.data.pipeline) normalises with, whatever data it reads: the CIFAR
# recipes' on-device split CIFAR-100's statistics, the ImageNet recipes' stream ImageNet's.
PIPELINE_STATS = {"on_device": (CIFAR_MEAN, CIFAR_STD), "tf_data": (IMAGENET_MEAN, IMAGENET_STD)}

CIFAR_PADDING = 4


def normalize(
    images: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
  """uint8 [..., C] -> ((x / 255) - mean) / std, torchvision's ToTensor + Normalize (§7.3).

  The arithmetic is float32 whatever `dtype` is; only the result is cast.
  """
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def sample_crop_flip(key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Draws the per-image RandomCrop offsets and flip bits used by `cifar_train_augment`.

  Returns `offsets` int32 [B, 2] = (top, left) into the 4-pixel-padded 40x40 image, each
  uniform in [0, 8] independently (torchvision's `randint(0, 40 - 32 + 1)`), and `flips`
  bool [B], True with probability 0.5. Public so tests can re-derive the exact crops.
  """
  offset_key, flip_key = jax.random.split(key)
  # Explicit 32-bit draws: with jax_enable_x64 the defaults are 64-bit, other crops and flips.
  offsets = jax.random.randint(offset_key, (batch_size, 2), 0, 2 * CIFAR_PADDING + 1, jnp.int32)
  flips = jax.random.bernoulli(flip_key, jnp.float32(0.5), (batch_size,))
  return offsets, flips


def crop_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array) -> jax.Array:
  """Crops each zero-padded image at `offsets`, then mirrors it where `flips` (§7.3).

  Equivalent to padding with 4 black pixels and slicing, but done as two gathers along H and W
  whose out-of-range indices (the padding) read 0; the flip is folded into the column indices.
  This was the fastest of the variants measured (pad + vmap(dynamic_slice), one-hot matmuls).
  Output has the input's shape and dtype.
  """
  _, height, width, _ = images.shape
  rows = offsets[:, 0:1] + jnp.arange(height) - CIFAR_PADDING  # [B, H]
  cols = jnp.where(flips[:, None], jnp.arange(width)[::-1], jnp.arange(width))
  cols = offsets[:, 1:2] + cols - CIFAR_PADDING  # [B, W]
  take = dict(mode="fill", fill_value=0, wrap_negative_indices=False)
  images = jnp.take_along_axis(images, rows[:, :, None, None], axis=1, **take)
  return jnp.take_along_axis(images, cols[:, None, :, None], axis=2, **take)


def cifar_train_augment(key: jax.Array, images: jax.Array,
                        dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """mdistiller's CIFAR train transform on a uint8 batch [B, H, W, 3] (spec §7.3).

  Padding pixels are 0 before normalisation (so -mean/std after), as with torchvision's
  RandomCrop(padding=4) on the PIL image.
  """
  offsets, flips = sample_crop_flip(key, images.shape[0])
  return normalize(crop_flip(images, offsets, flips), CIFAR_MEAN, CIFAR_STD, dtype)
