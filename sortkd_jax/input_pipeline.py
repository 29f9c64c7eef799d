"""Input pipelines: whole-split arrays for CIFAR, tf.data streams for ImageNet (spec §7.3).

CIFAR-sized data fits on the device, so a split is loaded once as host NumPy (uint8 images,
int32 labels); the trainer places it on the device(s) and crops/flips/normalises inside the jitted
dispatch (`augment.cifar_train_augment`). ImageNet is streamed with tf.data, cropped to uint8 on the
host, and normalised on the device (`augment.normalize`).

TensorFlow is imported lazily, only inside the functions that read data, and never sees the
accelerators, so the training core does not import it and it takes no GPU memory.
"""

import collections
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import jax
import numpy as np
from absl import logging

from sortkd_jax import torchvision_cifar

if TYPE_CHECKING:
  import ml_collections
  import tensorflow as tf

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "sortkd_jax")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # the files tfds.ImageFolder reads
_FOLDER_LAYOUT = "<folder>/<split>/<class_name>/<image>.jpg|.jpeg|.png"
_IMAGE_SIZE_HINT = "Set config.data.image_size to match, or resize the images beforehand."
# torchvision RandomResizedCrop defaults used by mdistiller's ImageNet train transform (§7.3).
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10


@functools.cache
def _tf() -> tuple[Any, Any]:
  """(tensorflow, tensorflow_datasets), imported on first use with GPUs hidden from TF."""
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        f"Reading tfds datasets and ImageNet streams needs TensorFlow and tensorflow-datasets "
        f"({e}): `pip install -r requirements.txt`. Without them a CIFAR recipe can read "
        "config.data.folder (an image folder, or torchvision's cifar-100-python) or "
        "config.data.name=synthetic.") from e

  tf.config.set_visible_devices([], "GPU")
  return tf, tfds


# ----------------------------------------------------------------------------- whole-split arrays


def validate_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Returns `labels` as int32 after checking they are integer class ids in [0, num_classes).

  An out-of-range id would otherwise be gathered silently (clamped or NaN) on the device.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool):
    raise ValueError(
        f"labels must be a 1-D integer array of class ids; got dtype {labels.dtype} and "
        f"shape {labels.shape}."
    )
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(
        f"{bad.size} of {labels.size} labels lie outside [0, {num_classes}): e.g. "
        f"{np.unique(bad)[:10].tolist()}. Check the dataset's label feature or the class folders."
    )
  return labels.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """A whole split in host memory: uint8 images [N, H, W, 3], int32 labels [N]."""

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise ValueError(
          f"images must be uint8 [N, H, W, 3]; got {self.images.dtype} {self.images.shape}."
      )
    if len(self.images) != len(self.labels):
      raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels.")
    if self.labels.dtype != np.int32:
      raise ValueError(f"labels must be int32 (see validate_labels); got {self.labels.dtype}.")
    validate_labels(self.labels, self.num_classes)


def load_array_split(
    *,
    name: str | None = None,
    split: str,
    data_dir: str | None = None,
    folder: str | None = None,
    cache_dir: str | None = None,
    image_size: int = 32,
    download: bool = False,
) -> ArraySplit:
  """Loads a whole image-classification split as host arrays (CIFAR-100 in spec §7.3).

  Sources, `folder` taking precedence over `name` when both are given:
  * `folder`: torchvision's CIFAR folder (`cifar-100-python` or `cifar-10-batches-py`, the
    data mdistiller trains on; `torchvision_cifar`), read as it is; or an image folder
    `<folder>/<split>/<class_name>/<image>` read by `tfds.ImageFolder`: label ids index the
    class names sorted over all splits, and the examples come in tfds' fixed shuffled order.
    Decoding takes a while (12 s for CIFAR-10's 50,000 JPEGs on two cores, 0.7 s from the
    cache), so the arrays are cached as
    `<cache_dir>/<folder name>-<split>-<decoder>-<hash of the absolute path>.npz` (default
    cache_dir `~/.cache/sortkd_jax`; decoder: TensorFlow's, or Pillow's without TensorFlow)
    and reused while the split's file count, total size, newest mtime and the class list are
    unchanged.
  * `name`: a tfds dataset with 'image' and 'label' features, e.g. 'cifar100', already prepared
    under `data_dir` (tfds' default when None). Nothing is downloaded unless `download=True`:
    offline, tfds retries for minutes before failing.

  * `name="synthetic"`: random CIFAR-shaped data (50,000 train / 10,000 test images, 100
    classes, fixed seeds), for benchmarks and timing whole runs where no data set is at hand.

  Every image must be `image_size` x `image_size` x 3; nothing is resized.
  """
  if folder is None and name == SYNTHETIC:
    return synthetic_split(split, image_size)
  if folder is not None:
    folder = os.path.abspath(os.path.expanduser(folder))
    cifar = torchvision_cifar.layout_of(folder)
    if cifar is None:
      return _load_folder_split(folder, split, cache_dir, image_size)
    images, labels, class_names = torchvision_cifar.read_split(folder, cifar, split)
    _check_image_size(images.shape, image_size, f"CIFAR folder {folder}, split {split!r}")
    return ArraySplit(images, validate_labels(labels, len(class_names)),  # to int32
                      len(class_names), class_names)
  if name is None:
    raise ValueError("Pass a tfds dataset `name` (e.g. 'cifar100') or a `folder`: torchvision's "
                     "CIFAR folder or an image folder.")
  ds, _, label = _open_split(name=name, folder=None, split=split, data_dir=data_dir,
                             download=download)
  images, labels = _to_arrays(ds, image_size, f"tfds dataset {name!r}, split {split!r}")
  return ArraySplit(images, validate_labels(labels, label.num_classes), label.num_classes,
                    tuple(label.names))


SYNTHETIC = "synthetic"
_SYNTHETIC_SIZES = {"train": 50_000, "test": 10_000}


def synthetic_split(split: str, image_size: int = 32, num_classes: int = 100) -> ArraySplit:
  """Random uint8 images and labels shaped like CIFAR-100's `split` (no TensorFlow needed)."""
  if split not in _SYNTHETIC_SIZES:
    raise ValueError(f"Synthetic data has splits {sorted(_SYNTHETIC_SIZES)}, not {split!r}.")
  rng = np.random.default_rng(sorted(_SYNTHETIC_SIZES).index(split))
  n = _SYNTHETIC_SIZES[split]
  return ArraySplit(rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
                    rng.integers(0, num_classes, (n,), dtype=np.int32), num_classes)


def load_splits(data: "ml_collections.ConfigDict",
                include_train: bool = True) -> list[ArraySplit]:
  """Train and test splits (or the test split alone) of a recipe's `config.data`, as host
  arrays, truncated to its max_*_examples."""
  source = dict(name=data.name, data_dir=data.data_dir, folder=data.folder,
                cache_dir=data.cache_dir, image_size=data.image_size, download=data.download)
  wanted = [("test", data.test_split, data.max_test_examples)]
  if include_train:
    wanted.insert(0, ("train", data.train_split, data.max_train_examples))
  splits = []
  for kind, split, limit in wanted:
    s = load_array_split(split=split, **source)
    if limit is not None and limit < len(s.labels):
      logging.info("Split %r: its first %d of %d images (config.data.max_%s_examples).", split,
                   limit, len(s.labels), kind)
      s = dataclasses.replace(s, images=s.images[:limit], labels=s.labels[:limit])
    splits.append(s)
  return splits


def stream_source(data: "ml_collections.ConfigDict") -> dict[str, Any]:
  """The source arguments (`split_info`, the ImageNet datasets) of a tf.data recipe's
  `config.data`."""
  return dict(name=data.name, folder=data.folder, data_dir=data.data_dir,
              manual_dir=data.manual_dir, download=data.download)


def _load_folder_split(folder: str, split: str, cache_dir: str | None,
                       image_size: int) -> ArraySplit:
  """Image-folder branch of `load_array_split`, with the decoded-array cache."""
  _check_folder_split(folder, split)
  # The two decoders give the same pixels in different example orders: each has its own cache.
  decoder = "tfds-exact-idct" if _have_tensorflow() else "pillow"
  fingerprint = _folder_fingerprint(folder, split, decoder)
  cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    raise ValueError(f"The cache directory {cache_dir!r} (config.data.cache_dir) is a file.")
  digest = hashlib.sha1(folder.encode()).hexdigest()[:12]
  cache_path = os.path.join(cache_dir,
                            f"{os.path.basename(folder)}-{split}-{decoder}-{digest}.npz")
  where = f"image folder {folder}, split {split!r}"

  cached = _read_folder_cache(cache_path, fingerprint)
  if cached is not None:
    images, labels, class_names = cached
    _check_image_size(images.shape, image_size, f"{where} (cached in {cache_path})")
    return ArraySplit(images, validate_labels(labels, len(class_names)), len(class_names),
                      class_names)

  logging.info("Decoding %s; the arrays will be cached in %s.", where, cache_path)
  if decoder.startswith("tfds"):
    ds, _, label = _open_split(name=None, folder=folder, split=split, data_dir=None,
                               download=False, decode=False)
    decoded = ds.map(lambda ex: {**ex, "image": decode_image(ex["image"])})
    tf, _ = _tf()
    try:
      images, labels = _to_arrays(decoded, image_size, where)
    except tf.errors.InvalidArgumentError as err:
      _raise_naming_undecodable(err, lambda: ds, where)
    class_names = tuple(label.names)
  else:
    images, labels, class_names = _decode_folder_with_pil(folder, split, image_size, where)
  labels = validate_labels(labels, len(class_names))
  os.makedirs(cache_dir, exist_ok=True)
  partial_path = f"{cache_path}.{os.getpid()}.tmp.npz"  # atomic: processes may race here
  np.savez(partial_path, images=images, labels=labels, class_names=np.array(class_names),
           fingerprint=np.array(fingerprint))
  os.replace(partial_path, cache_path)
  return ArraySplit(images, labels, len(class_names), class_names)


def _read_folder_cache(cache_path: str, fingerprint: str
                       ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]] | None:
  """The cached (images, labels, class names), or None if absent, stale or unreadable (e.g. a
  copy cut short): then the folder is decoded again and the cache rewritten."""
  if not os.path.exists(cache_path):
    return None
  try:
    with np.load(cache_path) as cached:
      if str(cached["fingerprint"]) != fingerprint:
        return None
      return (cached["images"], cached["labels"],
              tuple(str(c) for c in cached["class_names"]))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    logging.warning("Ignoring the unreadable cache %s (%s: %s).", cache_path,
                    type(e).__name__, e)
    return None


def _have_tensorflow() -> bool:
  """Whether TensorFlow and tfds are installed (found, not imported)."""
  return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tensorflow_datasets"))


def _decode_folder_with_pil(folder: str, split: str, image_size: int,
                            where: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """The image-folder split decoded with Pillow, for machines without TensorFlow (e.g. GPU
  boxes). Labels index the class names sorted over all splits, as `tfds.ImageFolder` does;
  files come in a fixed shuffled order (not tfds' one), so a truncated split mixes classes."""
  from PIL import Image

  _warn_of_skipped_files(folder, split)  # (the TF path: in `_scan_folder_split`)
  class_names = _folder_classes(folder)
  files = sorted((f.path, class_names.index(class_name))
                 for class_name, f in _split_image_files(folder, split))
  files = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
  images, bad, undecodable = [], [], []
  for path, _ in _with_progress(files, where, len(files), count=lambda _: 1):
    try:
      with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError):  # cut short, not an image, broken PNG chunk
      undecodable.append(path)
      continue
    if array.shape != (image_size, image_size, 3):
      bad.append(f"{os.path.basename(path)} {array.shape}")
    images.append(array)
  if undecodable:
    raise _undecodable_error(where, sorted(undecodable), len(files))
  if bad:
    raise ValueError(f"{where}: {len(bad)} of {len(files)} images are not ({image_size}, "
                     f"{image_size}, 3), e.g. {', '.join(bad[:5])}. {_IMAGE_SIZE_HINT}")
  return np.stack(images), np.array([label for _, label in files], np.int32), class_names


# Features naming an example's file: tfds.ImageFolder's (the path) and imagenet2012's.
_FILE_NAME_FEATURES = ("image/filename", "file_name")


def _undecodable_examples(ds: "tf.data.Dataset", where: str) -> tuple[list[str], int]:
  """(names of the examples of `ds` whose image `decode_image` rejects, examples checked).

  An example is named by its file name feature if it has one, else by its index in `ds`. The
  records are read as they are, so a reader error (a corrupt record file) raises as itself, and
  decoded in chunks from memory, where skipping a failed decode is safe (`ignore_errors` on a
  failing reader retries it forever).
  """
  tf, _ = _tf()
  total = int(ds.cardinality())
  key = next((k for k in _FILE_NAME_FEATURES if k in ds.element_spec), None)
  chunks = ds.map(lambda ex: (ex["image"], ex[key] if key else "")).batch(1024).prefetch(1)
  bad, start = [], 0
  for images, names in _with_progress(chunks.as_numpy_iterator(), where, total,
                                      count=lambda chunk: len(chunk[0])):
    decoded = tf.data.Dataset.from_tensor_slices(images).enumerate().map(
        lambda i, image: (i, tf.shape(decode_image(image))),
        num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ok = {int(i) for i, _ in decoded.as_numpy_iterator()}
    bad += [names[i].decode() if key else f"example #{start + i}"
            for i in range(len(images)) if i not in ok]
    start += len(images)
  return (sorted(bad) if key else bad), total


# TF's messages for an image it cannot decode ("Invalid JPEG data or crop window", "Unknown
# image file format", "Invalid PNG data", ...), as opposed to, say, a shape error.
_DECODE_FAILURE = re.compile(r"JPEG|PNG|GIF|BMP|image", re.IGNORECASE)


def _raise_naming_undecodable(err: Exception, records: Callable[[], "tf.data.Dataset"],
                              where: str, fix: str = "Replace or remove them.") -> NoReturn:
  """Raises a ValueError naming the undecodable images of `records()` (undecoded records)
  behind TF's decode error `err`, which names none; re-raises `err` if it is another error or
  every image decodes alone. A full pass over the records: only for when TF has failed."""
  if not _DECODE_FAILURE.search(str(err)):
    raise err
  ds = records()
  logging.warning("%s: an image could not be decoded; decoding its %d images again to find "
                  "which.", where, int(ds.cardinality()))
  bad, total = _undecodable_examples(ds, where)
  if not bad:
    logging.warning("%s: every image decodes when checked alone; TF's error follows.", where)
    raise err
  raise _undecodable_error(where, bad, total, fix) from err


def _undecodable_error(where: str, paths: list[str], total: int,
                       fix: str = "Replace or remove them.") -> ValueError:
  """One message naming the files that cannot be decoded, so they can be fixed or removed."""
  shown = ", ".join(paths[:10]) + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")
  return ValueError(f"{where}: {len(paths)} of {total} image files cannot be decoded (corrupt, "
                    f"cut short, or not an image): {shown}. {fix}")


def _with_progress(items: Iterable[Any], where: str, total: int | None, *,
                   count: Callable[[Any], int], every_s: float = 15.0) -> Iterator[Any]:
  """Yields `items`, logging the images decoded so far every `every_s` seconds: decoding a
  folder of JPEGs takes minutes, once (then the arrays are cached)."""
  start = last = time.monotonic()
  done = 0
  for item in items:
    yield item
    done += count(item)
    now = time.monotonic()
    if now - last >= every_s:
      of_total = f" of {total:,}" if total is not None else ""
      logging.info("%s: %s%s images decoded (%.0f/s).", where, f"{done:,}", of_total,
                   done / max(now - start, 1e-9))
      last = now


def _check_folder_split(folder: str, split: str) -> None:
  """Fails early, with what to change, on a missing or empty split or mismatched classes."""
  if torchvision_cifar.layout_of(folder):  # only load_array_split reads one
    raise ValueError(f"{folder} is torchvision's CIFAR folder: the CIFAR recipes read it (whole, "
                     "on the device), not a tf.data stream (ImageNet's), which reads image folders "
                     f"{_FOLDER_LAYOUT}.")
  split_dir = os.path.join(folder, split)
  if not os.path.isdir(split_dir):
    if os.path.isfile(folder):
      raise FileNotFoundError(_file_not_folder_message(folder))
    found = None
    if os.path.isdir(folder):
      found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    else:
      for layout in torchvision_cifar.LAYOUTS:
        if os.path.basename(folder) == layout.folder:
          raise FileNotFoundError(f"{folder} does not exist: unpack {layout.archive} "
                                  "(torchvision's download) so that it does.")
    cifar = [os.path.join(folder, s) for s in found or []
             if torchvision_cifar.layout_of(os.path.join(folder, s))]
    raise FileNotFoundError(
        f"No split {split!r} in image folder {folder} (expected {split_dir}). Expected layout: "
        f"{_FOLDER_LAYOUT}; "
        + (f"splits found: {found}." if found is not None else "the folder does not exist.")
        + (f" For torchvision's CIFAR files, pass --config.data.folder={' or '.join(cifar)}."
           if cifar else _eval_split_hint(folder, split, found or []))
    )
  if next(_split_image_files(folder, split), None) is None:
    raise ValueError(f"Image folder split {split_dir} has no images. Expected layout: "
                     f"{_FOLDER_LAYOUT}.")
  _check_folder_classes(folder)


def _file_not_folder_message(path: str) -> str:
  parent = os.path.dirname(path)
  if torchvision_cifar.layout_of(parent):
    return (f"config.data.folder {path} is one of torchvision's CIFAR files: pass their folder, "
            f"--config.data.folder={parent}.")
  unpack = (f" (tar xzf {os.path.basename(path)})"
            if path.endswith((".tar.gz", ".tgz", ".tar")) else "")
  return (f"config.data.folder {path} is a file, not a folder: unpack it first{unpack} if it "
          "is an archive, and pass the folder it gives.")


# Split names tried first when suggesting another eval split (ImageNet folders: validation).
_EVAL_SPLIT_NAMES = ("validation", "val", "test", "valid", "eval")


def _eval_split_hint(folder: str, split: str, found: list[str]) -> str:
  """For a missing eval split (not 'train'), how to evaluate on a found split with images."""
  others = [s for s in found if s not in ("train", split)
            and next(_split_image_files(folder, s), None) is not None]
  if split == "train" or not others:
    return ""
  others.sort(key=lambda s: s not in _EVAL_SPLIT_NAMES)  # stable: known eval names first
  return (f" To evaluate on the {others[0]!r} split ({os.path.join(folder, others[0])}) "
          f"instead, pass --config.data.test_split={others[0]}.")


def _check_folder_classes(folder: str) -> None:
  """Refuses splits with different class folders: labels index the classes of all splits, so
  a class would be trained but never tested (or the reverse), and the ids would not match a
  per-split index such as torchvision's ImageFolder (e.g. a ported teacher's)."""
  classes = _split_classes(folder)
  hidden = sorted(os.path.join(folder, s, c) for s, names in classes.items() for c in names
                  if s.startswith(".") or c.startswith("."))
  if hidden:  # e.g. Jupyter's .ipynb_checkpoints: a class of its own, every label shifted
    raise ValueError(
        f"Image folder {folder} has hidden folders that would be taken as classes: "
        f"{', '.join(hidden[:5])}{' ...' if len(hidden) > 5 else ''}. Remove them.")
  by_split = {s: c for s, c in classes.items() if c}  # unlabelled splits: skip
  every = set().union(*by_split.values())
  missing = {s: sorted(every - c) for s, c in sorted(by_split.items()) if every - c}
  if missing:
    listed = "; ".join(f"missing from {s!r}: {names[:10]}"
                       + (f" ({len(names)} in all)" if len(names) > 10 else "")
                       for s, names in missing.items())
    raise ValueError(
        f"Image folder {folder}: the splits have different class folders ({listed}). Give "
        "every split the same class folders (an empty one counts), or remove the extra ones.")


def _folder_fingerprint(folder: str, split: str, decoder: str) -> str:
  """Change detector for the cache, from the listing alone: the class list, every file's class,
  name, size and mtime (a file moved to another class keeps its size and mtime), and the
  decoder that filled it."""
  files = sorted((label, f.name, f.stat().st_size, f.stat().st_mtime_ns)
                 for label, f in _split_image_files(folder, split))
  listing = hashlib.sha1(json.dumps(files).encode()).hexdigest()
  return json.dumps(dict(classes=list(_folder_classes(folder)), files=len(files),
                         listing_sha1=listing, decoder=decoder))


def _folder_classes(folder: str) -> tuple[str, ...]:
  """The class names of an image folder, sorted over all splits (as `tfds.ImageFolder`)."""
  return tuple(sorted(set().union(*_split_classes(folder).values())))


def _split_classes(folder: str) -> dict[str, set[str]]:
  """{split: its class folder names} for every sub-folder (each is a split to tfds)."""
  return {s.name: {c.name for c in os.scandir(s.path) if c.is_dir()}
          for s in os.scandir(folder) if s.is_dir()}


def _warn_of_skipped_files(folder: str, split: str) -> None:
  """Logs the files of a split's class folders that are not images read here (e.g. .webp)."""
  skipped = [os.path.join(class_dir.path, f.name)
             for class_dir in os.scandir(os.path.join(folder, split)) if class_dir.is_dir()
             for f in os.scandir(class_dir.path)
             if f.is_file() and not f.name.lower().endswith(_IMAGE_EXTENSIONS)]
  if skipped:
    logging.warning("Skipping %d files of image folder %s, split %r, that are not %s, e.g. %s.",
                    len(skipped), folder, split, "/".join(_IMAGE_EXTENSIONS), skipped[0])


def _split_image_files(folder: str, split: str) -> Iterator[tuple[str, os.DirEntry]]:
  """(class name, file) for every image of `<folder>/<split>/<class>/`."""
  for class_dir in os.scandir(os.path.join(folder, split)):
    if class_dir.is_dir():
      for f in os.scandir(class_dir.path):
        if f.name.lower().endswith(_IMAGE_EXTENSIONS):
          yield class_dir.name, f


def _check_image_size(shape: tuple[int, ...], image_size: int, where: str) -> None:
  if tuple(shape[1:]) != (image_size, image_size, 3):
    raise ValueError(
        f"{where}: images are {shape[1:]}, expected ({image_size}, {image_size}, 3). "
        f"{_IMAGE_SIZE_HINT}"
    )


def _to_arrays(ds: "tf.data.Dataset", image_size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a tf.data split of {'image', 'label'} into (uint8 images, labels) NumPy arrays.

  Images of the wrong size are padded/cropped only so that batching works; they are then
  reported together (file names where known), not returned.
  """
  tf, tfds = _tf()
  image_shape = ds.element_spec["image"].shape
  if image_shape.rank != 3 or image_shape[-1] != 3:
    raise ValueError(f"{where}: images must be RGB [H, W, 3]; this dataset has {image_shape}.")

  def check(index, ex):
    shape = tf.shape(ex["image"])
    return dict(
        image=tf.image.resize_with_crop_or_pad(ex["image"], image_size, image_size),
        label=ex["label"],
        ok=tf.reduce_all(shape[:2] == image_size),
        shape=shape,
        name=ex.get("image/filename", tf.strings.as_string(index)),
    )

  total = int(ds.cardinality())
  ds = ds.enumerate().map(check, num_parallel_calls=tf.data.AUTOTUNE).batch(2048)
  chunks = list(_with_progress(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)), where,
                               total if total >= 0 else None, count=lambda c: len(c["label"])))
  if not chunks:
    raise ValueError(f"{where} has no examples.")
  batch = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  if not batch["ok"].all():
    bad = np.flatnonzero(~batch["ok"])
    examples = ", ".join(f"{batch['name'][i].decode()} {tuple(batch['shape'][i].tolist())}"
                         for i in bad[:5])
    raise ValueError(
        f"{where}: {len(bad)} of {len(bad) + batch['ok'].sum()} images are not "
        f"({image_size}, {image_size}, 3), e.g. {examples}. {_IMAGE_SIZE_HINT}"
    )
  return batch["image"], batch["label"]


# ----------------------------------------------------------------------------- tfds / folder source


def _open_split(
    *,
    name: str | None,
    folder: str | None,
    split: str,
    data_dir: str | None,
    download: bool,
    manual_dir: str | None = None,
    decode: bool = True,
    shuffle_seed: int | None = None,
    max_examples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple["tf.data.Dataset", int, Any]:
  """(this process's shard as tf.data, examples in the whole split, the ClassLabel feature).

  tfds datasets are split per process with `tfds.split_for_jax_process` (shard sizes differ by
  at most one) and read only in part. `tfds.ImageFolder` has no sub-splits, so a folder's file
  list is sharded with `Dataset.shard`, before any file is read. With `shuffle_seed`, tfds
  shuffles its files each epoch, and a folder shard takes a new order of all its files each
  epoch, as torch's `shuffle=True`. `max_examples` keeps the split's first ones, before
  sharding: the same examples for any process count.
  """
  tf, tfds = _tf()
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  if folder is not None:
    folder = os.path.abspath(os.path.expanduser(folder))
    _check_folder_split(folder, split)
    features, paths, labels = _folder_split_files(folder, split)
    full = tf.data.Dataset.from_tensor_slices((paths, labels))
    if max_examples is not None:
      full = full.take(max_examples)
    total = _split_size(full, split, process_count)
    local = full.shard(process_count, process_index)  # before reading: each its own files
    if shuffle_seed is not None:  # torch's shuffle=True: a new order of all files every epoch
      local = local.shuffle(local.cardinality(), seed=shuffle_seed, reshuffle_each_iteration=True)
    local = local.map(
        lambda path, label: features.decode_example(
            {"image": tf.io.read_file(path), "label": label, "image/filename": path},
            decoders=decoders),
        num_parallel_calls=tf.data.AUTOTUNE)
  elif name == SYNTHETIC:
    raise ValueError("data.name='synthetic' is random CIFAR-shaped data for the on-device "
                     "pipeline (the CIFAR configs), not for tf.data streams (ImageNet).")
  elif name is not None:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      close = difflib.get_close_matches(name, tfds.list_builders(), n=3)
      raise ValueError(
          f"Unknown tfds dataset {name!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                              else "")
          + f". Use a tfds name such as cifar100 or imagenet2012, {SYNTHETIC!r} (CIFAR "
          "configs), or --config.data.folder=DIR.") from None
    if (download or manual_dir) and not builder.is_prepared():
      if jax.process_count() > 1:  # every process would write the same files at once
        raise ValueError(
            f"tfds dataset {name!r} is not prepared under data_dir="
            f"{data_dir or '~/tensorflow_datasets'}; prepare it once before a multi-process "
            f"run: `tfds build {name} --data_dir=DIR"
            + (f" --manual_dir={manual_dir}`" if manual_dir else "`")
            + ", then pass --config.data.data_dir=DIR.")
      config = tfds.download.DownloadConfig(manual_dir=manual_dir)
      where = data_dir or "~/tensorflow_datasets"
      logging.info("Preparing tfds dataset %r under %s (once). Offline, its download fails only "
                   "after minutes of retries: Ctrl-C, and %s.", name, where, _folder_choices(name))
      try:
        builder.download_and_prepare(download_config=config)
      except Exception as err:
        raise RuntimeError(
            f"Could not download and prepare tfds dataset {name!r} under data_dir="
            f"{where} ({type(err).__name__}: {err}). Offline? "
            f"Prepare it where there is internet (`tfds build {name} --data_dir=DIR`) and pass "
            f"--config.data.data_dir=DIR, or {_folder_choices(name)}.") from err
    features = builder.info.features
    full = _tfds_as_dataset(builder, data_dir, split=split, decoders=decoders)
    if max_examples is not None:  # a smoke-test cap: the split's first ones, then sharded
      full = full.take(max_examples)
    total = _split_size(full, split, process_count)
    if max_examples is not None:
      local = full.shard(process_count, process_index)
    else:
      local = _tfds_as_dataset(
          builder, data_dir,
          split=tfds.split_for_jax_process(split, process_index=process_index,
                                           process_count=process_count),
          decoders=decoders,
          shuffle_files=shuffle_seed is not None,
          read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
      )
  else:
    raise ValueError("Pass a tfds dataset `name` (e.g. 'imagenet2012') or an image `folder`.")
  return local, total, features["label"]


def _folder_split_files(folder: str, split: str) -> tuple[Any, "tf.Tensor", "tf.Tensor"]:
  """(`tfds.ImageFolder(folder)`'s features, the split's file paths, their label ids), in
  ImageFolder's fixed order (its `as_dataset` reads them in this order).

  Taken from ImageFolder's (private; tfds is pinned) file table, so that a stream can shard and
  shuffle the files before reading any: its own `shuffle_files` is unseeded and reads them all.
  Scanned once per process while the folder's listing is unchanged: a scan lists every file
  (seconds for ImageNet's 1.3M, more on network disks), and a run opens its folder for every
  epoch's train stream and evaluation.
  """
  return _scan_folder_split(folder, split, _listing_stamp(folder))


def _listing_stamp(folder: str) -> tuple[tuple[str, int], ...]:
  """The modification times of `folder`, its split and class folders: adding, removing or
  renaming a file or folder changes one, and with it what `tfds.ImageFolder` would list."""
  stamp = [(folder, os.stat(folder).st_mtime_ns)]
  for split_dir in os.scandir(folder):
    if split_dir.is_dir():
      stamp.append((split_dir.path, split_dir.stat().st_mtime_ns))
      stamp += [(d.path, d.stat().st_mtime_ns) for d in os.scandir(split_dir.path) if d.is_dir()]
  return tuple(sorted(stamp))


@functools.lru_cache(maxsize=2)  # a run's train and test splits
def _scan_folder_split(folder: str, split: str, stamp: tuple[tuple[str, int], ...]
                       ) -> tuple[Any, "tf.Tensor", "tf.Tensor"]:
  tf, _ = _tf()
  builder = _scan_folder(folder, stamp)
  _warn_of_skipped_files(folder, split)
  label_id = {name: i for i, name in enumerate(builder.info.features["label"].names)}
  examples = builder._split_examples[split]
  return (builder.info.features, tf.constant([e.image_path for e in examples], tf.string),
          tf.constant([label_id[e.label] for e in examples], tf.int64))


@functools.lru_cache(maxsize=1)
def _scan_folder(folder: str, stamp: tuple[tuple[str, int], ...]) -> Any:
  del stamp  # part of the cache key only
  _, tfds = _tf()
  start = time.perf_counter()
  logging.info("Listing the files of image folder %s.", folder)
  builder = tfds.ImageFolder(folder)
  logging.info("Image folder %s: %s in %.1f s.", folder, ", ".join(
      f"{split} {info.num_examples:,} files" for split, info in builder.info.splits.items()),
      time.perf_counter() - start)
  return builder


def _folder_choices(name: str) -> str:
  """The folders that can stand in for tfds dataset `name`."""
  cifar = ("torchvision's CIFAR folder, as it is (e.g. mdistiller's data/cifar-100-python), or "
           if name.startswith("cifar") else "")
  return f"pass --config.data.folder=DIR: {cifar}an image folder {_FOLDER_LAYOUT}"


def _split_size(ds: "tf.data.Dataset", split: str, process_count: int) -> int:
  """The examples of a whole split, checked: each process must get some (an empty shard would
  end its stream while the others wait for it)."""
  total = int(ds.cardinality())
  if total < 0:
    raise ValueError(f"The size of split {split!r} is unknown to tf.data; cannot shard or pad it.")
  if total < process_count:
    raise ValueError(f"Split {split!r} has {total} examples, fewer than the {process_count} "
                     "processes that each read a shard of it.")
  return total


def _tfds_as_dataset(builder: Any, data_dir: str | None, **kwargs: Any) -> Any:
  """`builder.as_dataset`, turning tfds' "could not find data" into guidance."""
  try:
    return builder.as_dataset(**kwargs)
  except Exception as err:
    if builder.is_prepared():
      raise
    raise FileNotFoundError(
        f"tfds dataset {builder.name!r} is not prepared under data_dir="
        f"{data_dir or '~/tensorflow_datasets (tfds default)'}. Either prepare it once where "
        f"there is internet (`tfds build {builder.name} --data_dir=DIR`; ImageNet needs "
        "`--manual_dir` holding the ILSVRC2012 tars) and pass --config.data.data_dir=DIR, or "
        f"{_folder_choices(builder.name)}."
    ) from err


def split_info(*, split: str, name: str | None = None, folder: str | None = None,
               data_dir: str | None = None, manual_dir: str | None = None,
               download: bool = False) -> tuple[int, int]:
  """(number of examples, number of classes) of a split, without reading its images."""
  _, total, label = _open_split(name=name, folder=folder, split=split, data_dir=data_dir,
                                download=download, manual_dir=manual_dir, decode=False)
  return total, label.num_classes


# ----------------------------------------------------------------------------- ImageNet streams


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


def _resize_uint8(image: Any, size: Any) -> Any:
  """Antialiased bilinear resize (torchvision's, through PIL), back to uint8.

  TF computes in float and rounds once; PIL in fixed point, rounding between its two passes
  (in an order Pillow 13 picks per image): pixels are within 1 grey level, unbiased."""
  tf, _ = _tf()
  image = tf.image.resize(image, size, method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _random_resized_crop_window(height: Any, width: Any, seed: Any) -> tuple[Any, Any, Any, Any]:
  """torchvision `RandomResizedCrop.get_params` (§7.3): (top, left, h, w) as int32 tensors.

  Ten tries of area ~ U(0.08, 1)·H·W and log-aspect ~ U(log 3/4, log 4/3); the first crop that
  fits wins, else the centre crop clamped to the aspect range. All tries are drawn at once.
  """
  tf, _ = _tf()
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


def decode_image(encoded: Any) -> Any:
  """Encoded bytes to uint8 [H, W, 3]; JPEGs with the exact IDCT, so pixels equal PIL's.

  torchvision reads ImageNet through PIL; TF's default fast IDCT is about 1 grey level off."""
  tf, _ = _tf()
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


# Pixels decoded around a JPEG crop window: libjpeg upsamples subsampled chroma (4:2:0, the
# usual ImageNet file) from the neighbouring chroma samples, which a window that starts at the
# crop treats as the image's edge; with 1 pixel of margin the crop equals PIL's whole-image
# decode on 4:2:0 and 4:2:2 files (tests/test_input_pipeline.py), 4 allows every sampling factor.
_JPEG_CROP_MARGIN = 4


def decode_jpeg_window(encoded: Any, top: Any, left: Any, h: Any, w: Any, *, height: Any,
                       width: Any) -> Any:
  """The (top, left, h, w) crop of a [height, width] JPEG, decoding only a margin around it;
  pixels equal PIL's whole-image decode cropped (torchvision decodes first, then crops)."""
  tf, _ = _tf()
  top0 = tf.maximum(top - _JPEG_CROP_MARGIN, 0)
  left0 = tf.maximum(left - _JPEG_CROP_MARGIN, 0)
  bottom = tf.minimum(top + h + _JPEG_CROP_MARGIN, height)
  right = tf.minimum(left + w + _JPEG_CROP_MARGIN, width)
  image = tf.image.decode_and_crop_jpeg(
      encoded, tf.stack([top0, left0, bottom - top0, right - left0]), channels=3,
      dct_method="INTEGER_ACCURATE")
  return image[top - top0:top - top0 + h, left - left0:left - left0 + w]


def _train_image(encoded: Any, seed: Any, image_size: int) -> Any:
  """RandomResizedCrop(image_size) + RandomHorizontalFlip on encoded bytes, uint8 out (§7.3).

  JPEGs are decoded only around the crop window; other formats (PNG) are decoded whole.
  """
  tf, _ = _tf()
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
  tf, _ = _tf()
  image = decode_image(encoded)
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
  tf, _ = _tf()
  if steps_per_epoch is None and len(seeds) != 1:
    raise ValueError(f"An endless stream (steps_per_epoch=None) takes one seed, got {seeds}.")
  index, count, local_batch = _process_shard(process_index, process_count, global_batch_size)
  epochs = []
  for seed in seeds:
    base_seed = seed * count + index
    ds, _, _ = _open_split(name=name, folder=folder, split=split, data_dir=data_dir,
                           download=download, manual_dir=manual_dir, decode=False,
                           shuffle_seed=base_seed, process_index=index, process_count=count)
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
  tf, _ = _tf()
  if resize_size < image_size:
    raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}.")
  index, count, local_batch = _process_shard(process_index, process_count, global_batch_size)
  ds, total, _ = _open_split(name=name, folder=folder, split=split, data_dir=data_dir,
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
  tf, _ = _tf()
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as err:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count

    def records():  # opened only if `err` is a decode failure
      return _open_split(name=name, folder=folder, split=split, data_dir=data_dir,
                         download=download, manual_dir=manual_dir, decode=False,
                         max_examples=max_examples, process_index=index,
                         process_count=count)[0]

    where = (f"image folder {os.path.abspath(os.path.expanduser(folder))}" if folder is not None
             else f"tfds dataset {name!r}") + f", split {split!r}"
    if count > 1:
      where += f" (process {index} of {count})"
    fix = ("Replace or remove them." if folder is not None else
           "Fix them in the files the dataset is prepared from, and prepare it again.")
    _raise_naming_undecodable(err, records, where, fix)


def prefetch_to_device(
    batches: Iterable[dict[str, np.ndarray]], size: int, sharding: jax.sharding.Sharding
) -> Iterator[dict[str, jax.Array]]:
  """Turns per-process NumPy batches into global jax.Arrays, keeping `size` transfers in flight.

  Each leaf's leading axis is this process's slice of the global batch, assembled with
  `jax.make_array_from_process_local_data(sharding, leaf)`; transfers are asynchronous, so
  queueing them ahead overlaps host-to-device copies with the step. Use
  `prefetch_to_device(ds.as_numpy_iterator(), 2, NamedSharding(mesh, P('data')))`.
  """
  queue = collections.deque()
  iterator = iter(batches)

  def enqueue(n: int) -> None:
    for batch in itertools.islice(iterator, n):
      queue.append(jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x), batch))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
