"""ImageNet tf.data streams: mdistiller's torchvision transforms on uint8, per process (§7.3).

Train: RandomResizedCrop + RandomHorizontalFlip, seeded per example so a run is reproducible;
eval: Resize + CenterCrop, padded with masked entries so that every process steps together.
Images are normalised on the device (`augment.normalize`); `distributed.prefetch_to_device`
turns the batches into global arrays.
"""

import functools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from sortkd_jax import data_sources

if TYPE_CHECKING:
  import tensorflow as tf


# torchvision RandomResizedCrop defaults used by mdistiller's ImageNet train transform (§7.3).
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10


def _process_shard(process_index: int | None, process_count: int | None,
                   global_batch_size: int) -> tuple[int, int, int]:
  """(process index, process count, per-process batch), defaulting to JAX's processes."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be divisible by the {count} processes."
    )
  return index, count, global_batch_size // count


def imagenet_train_dataset(*, seed: int = 0, **kwargs: Any) -> "tf.data.Dataset":
  """This process's endless stream of train batches seeded by `seed`; `kwargs` (the source,
  `global_batch_size`, ...) as `imagenet_train_epochs`, which describes the batches."""
  return imagenet_train_epochs(seeds=[seed], steps_per_epoch=None, **kwargs)


def imagenet_train_epochs(
    *,
    seeds: Sequence[int],
    steps_per_epoch: int | None,
    global_batch_size: int,
    name: str | None = "imagenet2012",
    folder: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = False,
    image_size: int = 224,
    shuffle_buffer: int = 16 * 1024,
    process_index: int | None = None,
    process_count: int | None = None,
) -> "tf.data.Dataset":
  """This process's train batches {'image': uint8 [b, S, S, 3], 'label': int32}: the first
  `steps_per_epoch` of the stream seeded by s, for each s of `seeds` in turn (with
  `steps_per_epoch=None`, one seed's endless stream).

  mdistiller's ImageNet train transform (spec §7.3), with b = global_batch_size / processes:
  epochs follow each other without a partial batch between them. Shuffled per epoch: a tfds
  dataset's record files, then a buffer of `shuffle_buffer` examples; a folder takes a new
  order of all its files (no buffer, which would only read that many files before the first
  batch). Crops and flips are seeded per example, so a run is reproducible.
  `manual_dir` (the ILSVRC2012 tars) or `download` prepares the tfds dataset first if needed.

  One stream for a whole run: a tf.data iterator waits for tf.data's autotuning thread when it
  ends (seconds to a minute, TF 2.21), and the image transform is traced once, not per epoch
  (0.1 to 0.3 s each).
  """
  tf, _ = data_sources.tf_and_tfds()
  if steps_per_epoch is None and len(seeds) != 1:
    raise ValueError(f"An endless stream (steps_per_epoch=None) takes one seed, got {seeds}.")
  index, count, local_batch = _process_shard(process_index, process_count, global_batch_size)
  epochs = []
  for seed in seeds:
    base_seed = seed * count + index
    ds, _, _ = data_sources.open_split(name=name, folder=folder, split=split, data_dir=data_dir,
                                       download=download, manual_dir=manual_dir, decode=False,
                                       shuffle_seed=base_seed, process_index=index,
                                       process_count=count)
    if folder is None:
      ds = ds.shuffle(shuffle_buffer, seed=base_seed, reshuffle_each_iteration=True)
    # Each example's crop and flip seed: (its epoch's seed, its place in the epoch).
    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensors(np.int64(base_seed)).repeat(),
                             tf.data.Dataset.counter(), ds.repeat())
    epochs.append(ds if steps_per_epoch is None else ds.take(steps_per_epoch * local_batch))
  ds = functools.reduce(lambda ds, next_epoch: ds.concatenate(next_epoch), epochs)

  def transform(base_seed, i, ex):
    return {"image": _train_image(ex["image"], tf.stack([base_seed, i]), image_size),
            "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def imagenet_eval_dataset(
    *,
    global_batch_size: int,
    name: str | None = "imagenet2012",
    folder: str | None = None,
    split: str = "validation",
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = False,
    image_size: int = 224,
    resize_size: int = 256,
    max_examples: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> "tf.data.Dataset":
  """This process's eval batches {'image': uint8, 'label': int32, 'mask': bool}, one pass.

  Resize(256) + CenterCrop(224) (spec §7.3). No example is dropped: the last batches are padded
  with mask=False entries, and every process yields ceil(ceil(N / processes) / b) batches so
  that all processes step together. `max_examples` (smoke tests) keeps the split's first ones.
  """
  tf, _ = data_sources.tf_and_tfds()
  if resize_size < image_size:
    raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}.")
  index, count, local_batch = _process_shard(process_index, process_count, global_batch_size)
  ds, total, _ = data_sources.open_split(name=name, folder=folder, split=split, data_dir=data_dir,
                                         download=download, manual_dir=manual_dir, decode=False,
                                         max_examples=max_examples, process_index=index,
                                         process_count=count)
  per_process = -(-total // count)  # ceil: the largest shard
  num_batches = -(-per_process // local_batch)
  ds = ds.map(lambda ex: {"image": _eval_image(ex["image"], image_size, resize_size),
                          "label": tf.cast(ex["label"], tf.int32),
                          "mask": tf.constant(True)},
              num_parallel_calls=tf.data.AUTOTUNE)
  padding = {"image": tf.zeros([image_size, image_size, 3], tf.uint8),
             "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  return ds.take(num_batches * local_batch).batch(local_batch).prefetch(tf.data.AUTOTUNE)


def naming_undecodable(
    batches: Iterable[dict[str, np.ndarray]],
    *,
    split: str,
    name: str | None = "imagenet2012",
    folder: str | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = False,
    max_examples: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields `batches`: this process's stream of `split`, from `imagenet_train_dataset` or
  `imagenet_eval_dataset` with the same source arguments. An image that cannot be decoded
  ends it with a ValueError naming its file (TF's error names none).

  A failed decode cannot be caught inside tf.data short of a Python call per image, so it is
  caught here, off the hot path; only then is this process's shard decoded again, in parallel
  with progress logs (minutes for ImageNet), to name all its undecodable files at once.
  """
  tf, _ = data_sources.tf_and_tfds()
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as err:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count

    def records():  # opened only if `err` is a decode failure
      return data_sources.open_split(name=name, folder=folder, split=split, data_dir=data_dir,
                                     download=download, manual_dir=manual_dir, decode=False,
                                     max_examples=max_examples, process_index=index,
                                     process_count=count)[0]

    where = (f"image folder {os.path.abspath(os.path.expanduser(folder))}" if folder is not None
             else f"tfds dataset {name!r}") + f", split {split!r}"
    if count > 1:
      where += f" (process {index} of {count})"
    fix = ("Replace or remove them." if folder is not None else
           "Fix them in the files the dataset is prepared from, and prepare it again.")
    data_sources.raise_naming_undecodable(err, records, where, fix)


def _train_image(encoded: Any, seed: Any, image_size: int) -> Any:
  """RandomResizedCrop(image_size) + RandomHorizontalFlip on encoded bytes, uint8 out (§7.3).

  JPEGs are decoded only around the crop window; other formats (PNG) are decoded whole.
  """
  tf, _ = data_sources.tf_and_tfds()
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = _random_resized_crop_window(shape[0], shape[1], crop_seed)
    return decode_jpeg_window(encoded, *window, height=shape[0], width=shape[1])

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    top, left, h, w = _random_resized_crop_window(shape[0], shape[1], crop_seed)
    return image[top:top + h, left:left + w]

  crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image = _resize_uint8(crop, [image_size, image_size])
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def _eval_image(encoded: Any, image_size: int, resize_size: int) -> Any:
  """Resize(resize_size) on the shorter side + CenterCrop(image_size), torchvision's rounding."""
  tf, _ = data_sources.tf_and_tfds()
  image = data_sources.decode_image(encoded)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  new_long = resize_size * long // short  # torchvision: int(size * long / short)
  new_h = tf.where(height <= width, resize_size, new_long)
  new_w = tf.where(height <= width, new_long, resize_size)
  image = _resize_uint8(image, tf.stack([new_h, new_w]))
  # torchvision CenterCrop: int(round((new - size) / 2)), Python's round half to even.
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2), tf.int32)
  return image[top:top + image_size, left:left + image_size]


def _random_resized_crop_window(height: Any, width: Any, seed: Any) -> tuple[Any, Any, Any, Any]:
  """torchvision `RandomResizedCrop.get_params` (§7.3): (top, left, h, w) as int32 tensors.

  Ten tries of area ~ U(0.08, 1)·H·W and log-aspect ~ U(log 3/4, log 4/3); the first crop that
  fits wins, else the centre crop clamped to the aspect range. All tries are drawn at once.
  """
  tf, _ = data_sources.tf_and_tfds()
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  area = tf.cast(height * width, tf.float32)
  target = area * tf.random.stateless_uniform([_CROP_ATTEMPTS], area_seed, *_CROP_SCALE)
  log_ratio = tf.random.stateless_uniform(
      [_CROP_ATTEMPTS], ratio_seed, math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
  aspect = tf.exp(log_ratio)
  ws = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  hs = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  fheight, fwidth = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  in_ratio = fwidth / fheight
  centre_w = tf.where(in_ratio > _CROP_RATIO[1],
                      tf.cast(tf.round(fheight * _CROP_RATIO[1]), tf.int32), width)
  centre_h = tf.where(in_ratio < _CROP_RATIO[0],
                      tf.cast(tf.round(fwidth / _CROP_RATIO[0]), tf.int32), height)
  found = tf.reduce_any(fits)
  h = tf.where(found, hs[first], centre_h)
  w = tf.where(found, ws[first], centre_w)
  # torchvision: randint(0, H - h + 1) after a successful try, else the centre.
  top = tf.where(found, tf.random.stateless_uniform(
      [], top_seed, 0, height - h + 1, dtype=tf.int32), (height - h) // 2)
  left = tf.where(found, tf.random.stateless_uniform(
      [], left_seed, 0, width - w + 1, dtype=tf.int32), (width - w) // 2)
  return top, left, h, w


def _resize_uint8(image: Any, size: Any) -> Any:
  """Antialiased bilinear resize (torchvision's, through PIL), back to uint8.

  TF computes in float and rounds once; PIL in fixed point, rounding between its two passes
  (in an order Pillow 13 picks per image): pixels are within 1 grey level, unbiased."""
  tf, _ = data_sources.tf_and_tfds()
  image = tf.image.resize(image, size, method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


# Pixels decoded around a JPEG crop window: libjpeg upsamples subsampled chroma (4:2:0, the
# usual ImageNet file) from the neighbouring chroma samples, which a window that starts at the
# crop treats as the image's edge; with 1 pixel of margin the crop equals PIL's whole-image
# decode on 4:2:0 and 4:2:2 files (tests/test_input_pipeline.py), 4 allows every sampling factor.
_JPEG_CROP_MARGIN = 4


def decode_jpeg_window(encoded: Any, top: Any, left: Any, h: Any, w: Any, *, height: Any,
                       width: Any) -> Any:
  """The (top, left, h, w) crop of a [height, width] JPEG, decoding only a margin around it;
  pixels equal PIL's whole-image decode cropped (torchvision decodes first, then crops)."""
  tf, _ = data_sources.tf_and_tfds()
  top0 = tf.maximum(top - _JPEG_CROP_MARGIN, 0)
  left0 = tf.maximum(left - _JPEG_CROP_MARGIN, 0)
  bottom = tf.minimum(top + h + _JPEG_CROP_MARGIN, height)
  right = tf.minimum(left + w + _JPEG_CROP_MARGIN, width)
  image = tf.image.decode_and_crop_jpeg(
      encoded, tf.stack([top0, left0, bottom - top0, right - left0]), channels=3,
      dct_method="INTEGER_ACCURATE")
  return image[top - top0:top - top0 + h, left - left0:left - left0 + w]
