"""On-device CIFAR augmentation (spec §7.3): exact crops/flips, their statistics, normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sortkd_jax import augment


def _images(batch: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)


def _numpy_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """torchvision RandomCrop(32, padding=4) + flip, written out: pad with 0, slice, mirror."""
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  out = np.stack([padded[i, y : y + 32, x : x + 32] for i, (y, x) in enumerate(offsets)])
  return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def test_crops_and_flips_match_explicit_numpy():
  images = _images(256)
  key = jax.random.key(3)
  offsets, flips = map(np.asarray, augment.sample_crop_flip(key, 256))
  expected = _numpy_crop_flip(images, offsets, flips)
  got = augment.crop_flip(jnp.asarray(images), offsets, flips)
  np.testing.assert_array_equal(np.asarray(got), expected)
  out = augment.cifar_train_augment(key, jnp.asarray(images))
  want = (expected / 255.0 - np.array(augment.CIFAR_MEAN)) / np.array(augment.CIFAR_STD)
  np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-5)


def test_padding_is_black_before_normalisation():
  images = np.full((1, 32, 32, 3), 200, np.uint8)
  offsets, flips = np.array([[0, 8]]), np.array([False])
  out = np.asarray(augment.crop_flip(jnp.asarray(images), offsets, flips))[0]
  assert (out[:4] == 0).all() and (out[:, 28:] == 0).all() and (out[4:, :28] == 200).all()
  normalised = augment.normalize(jnp.asarray(out), augment.CIFAR_MEAN, augment.CIFAR_STD)
  np.testing.assert_allclose(
      np.asarray(normalised)[0, 0],
      -np.array(augment.CIFAR_MEAN) / np.array(augment.CIFAR_STD), rtol=1e-6
  )


def test_offsets_cover_range_and_flips_are_fair():
  offsets, flips = augment.sample_crop_flip(jax.random.key(0), 20_000)
  offsets, flips = np.asarray(offsets), np.asarray(flips)
  for axis in range(2):
    counts = np.bincount(offsets[:, axis], minlength=9)
    assert len(counts) == 9 and counts.min() > 0.8 * 20_000 / 9, counts
  assert abs(flips.mean() - 0.5) < 0.02
  # y and x are drawn independently.
  assert abs(np.corrcoef(offsets[:, 0], offsets[:, 1])[0, 1]) < 0.03


def test_crops_and_flips_do_not_depend_on_jax_enable_x64():
  """x64's 64-bit default draws gave other crops and flips: a run resumed under it changed."""
  key = jax.random.PRNGKey(3)
  offsets, flips = augment.sample_crop_flip(key, 64)
  with jax.enable_x64(True):
    offsets_x64, flips_x64 = augment.sample_crop_flip(key, 64)
  assert offsets_x64.dtype == jnp.int32
  np.testing.assert_array_equal(offsets_x64, offsets)
  np.testing.assert_array_equal(flips_x64, flips)


def test_different_keys_give_different_augmentations():
  images = jnp.asarray(_images(64))
  a = augment.cifar_train_augment(jax.random.key(0), images)
  b = augment.cifar_train_augment(jax.random.key(1), images)
  assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_and_jit_equals_eager(dtype):
  images = jnp.asarray(_images(32))
  key = jax.random.key(7)
  eager = augment.cifar_train_augment(key, images, dtype=dtype)
  jitted = jax.jit(augment.cifar_train_augment, static_argnames="dtype")(key, images, dtype=dtype)
  assert eager.dtype == dtype and eager.shape == (32, 32, 32, 3)
  # XLA may fuse /255 and /std differently under jit: equal up to one rounding of `dtype`.
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(eager, np.float32), np.asarray(jitted, np.float32),
                             rtol=eps, atol=eps)


def test_normalize_numbers():
  """ToTensor + Normalize: x / 255, minus mean, over std, with spec §7.3's constants (written
  out here from the spec's table, not read from `augment`)."""
  spec = {"CIFAR": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
          "IMAGENET": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
  pixel = jnp.array([[0, 128, 255]], jnp.uint8)
  for dataset, (mean, std) in spec.items():
    constants = (getattr(augment, f"{dataset}_MEAN"), getattr(augment, f"{dataset}_STD"))
    assert constants == (mean, std), dataset
    got = np.asarray(augment.normalize(pixel, *constants))
    want = (np.array([0, 128, 255]) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6, err_msg=dataset)
    # bfloat16 output: the float32 result, rounded once (no bf16 arithmetic), for every pixel.
    every = jnp.tile(jnp.arange(256, dtype=jnp.uint8)[:, None], (1, 3))
    np.testing.assert_array_equal(
        augment.normalize(every, *constants, jnp.bfloat16),
        augment.normalize(every, *constants).astype(jnp.bfloat16), err_msg=dataset)
