"""Whole-split arrays: CIFAR-sized data held on the host and placed on the device (spec §7.3).

A split is loaded once as host NumPy (uint8 images, int32 labels); the trainer places it on the
device(s) and crops/flips/normalises inside the jitted dispatch (`augment.cifar_train_augment`).
An image folder's decoded arrays are cached on disk. Sources and folder checks:
`data_sources`; ImageNet is streamed instead (`imagenet_input`).
"""

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import random
import socket
import time
import zipfile
import zlib
from typing import IO, TYPE_CHECKING, Iterator

import numpy as np
from absl import logging

from sortkd_jax import data_sources, torchvision_cifar

if TYPE_CHECKING:
  import ml_collections
  import PIL.Image
  import tensorflow as tf


_IMAGE_SIZE_HINT = "Set config.data.image_size to match, or resize the images beforehand."


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

  def crc32(self) -> int:
    """CRC-32 of the pixels, then the labels, in order: what a resumed run checks it trains on
    (0.1 s for CIFAR's 150 MB of train images)."""
    return zlib.crc32(np.ascontiguousarray(self.labels),
                      zlib.crc32(np.ascontiguousarray(self.images)))


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
    cache_dir `default_cache_dir()`; decoder: TensorFlow's, or Pillow's without TensorFlow)
    and reused while every file's class, name, size and mtime and the class list are unchanged
    (`_folder_fingerprint`).
  * `name`: a tfds dataset with 'image' and 'label' features, e.g. 'cifar100', already prepared
    under `data_dir` (tfds' default when None). Nothing is downloaded unless `download=True`:
    offline, tfds retries for minutes before failing.

  * `name="synthetic"`: random CIFAR-shaped data (50,000 train / 10,000 test images, 100
    classes, fixed seeds), for benchmarks and timing whole runs where no data set is at hand.

  Every image must be `image_size` x `image_size` x 3; nothing is resized.
  """
  if folder is None and name == data_sources.SYNTHETIC:
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
  ds, _, label = data_sources.open_split(name=name, folder=None, split=split, data_dir=data_dir,
                                         download=download)
  images, labels = _to_arrays(ds, image_size, f"tfds dataset {name!r}, split {split!r}")
  return ArraySplit(images, validate_labels(labels, label.num_classes), label.num_classes,
                    tuple(label.names))


_SYNTHETIC_SIZES = {"train": 50_000, "test": 10_000}
_SYNTHETIC_CLASSES = 100


def synthetic_split(split: str, image_size: int = 32) -> ArraySplit:
  """Random uint8 images and labels shaped like CIFAR-100's `split` (no TensorFlow needed)."""
  if split not in _SYNTHETIC_SIZES:
    raise ValueError(f"Synthetic data has splits {sorted(_SYNTHETIC_SIZES)}, not {split!r}.")
  rng = np.random.default_rng(sorted(_SYNTHETIC_SIZES).index(split))
  n = _SYNTHETIC_SIZES[split]
  return ArraySplit(rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
                    rng.integers(0, _SYNTHETIC_CLASSES, (n,), dtype=np.int32), _SYNTHETIC_CLASSES)


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


def default_cache_dir() -> str:
  """`$XDG_CACHE_HOME/sortkd_jax`, else `~/.cache/sortkd_jax`: the XDG convention pip and torch
  follow, so that a cluster's small home quota is spared as for them."""
  xdg = os.environ.get("XDG_CACHE_HOME", "")
  return os.path.join(xdg if os.path.isabs(xdg) else os.path.join("~", ".cache"), "sortkd_jax")


def _load_folder_split(folder: str, split: str, cache_dir: str | None,
                       image_size: int) -> ArraySplit:
  """Image-folder branch of `load_array_split`, with the decoded-array cache."""
  data_sources.check_folder_split(folder, split)
  # The two decoders give the same order and, for the JPEGs tested, the same pixels; each keeps
  # its own cache all the same. (Caches named "pillow" hold an older order: not read.)
  decoder = "tfds-exact-idct" if _have_tensorflow() else "pillow-tfds-order"
  fingerprint = _folder_fingerprint(folder, split, decoder)
  cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
  if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    raise ValueError(f"The cache directory {cache_dir!r} (config.data.cache_dir) is a file.")
  # The digest tells folders apart: the name keeps a readable prefix, within the 255 bytes a
  # file name may have (a long folder name was never cached).
  digest = hashlib.sha1(os.fsencode(folder)).hexdigest()[:12]
  cache_path = os.path.join(cache_dir,
                            f"{os.path.basename(folder)[:64]}-{split}-{decoder}-{digest}.npz")
  where = f"image folder {folder}, split {split!r}"

  cached = _read_folder_cache(cache_path, fingerprint)
  if cached is None:
    with _decoding_turn(cache_path, where) as waited:
      if waited:  # for a process that has decoded it meanwhile
        cached = _read_folder_cache(cache_path, fingerprint)
      if cached is None:
        return _decode_and_cache(folder, split, decoder, fingerprint, cache_path, image_size,
                                 where)
  images, labels, class_names = cached
  logging.info("Read %s from its cache %s (decoded before; changed files would be decoded "
               "again).", where, cache_path)
  _check_image_size(images.shape, image_size, f"{where} (cached in {cache_path})")
  return ArraySplit(images, validate_labels(labels, len(class_names)), len(class_names),
                    class_names)


@contextlib.contextmanager
def _decoding_turn(cache_path: str, where: str) -> Iterator[bool]:
  """One process at a time decodes a folder's split (a sweep's runs start together, and
  decoding takes minutes): the others wait, then read its cache. Yields whether it waited.
  Where the cache's folder cannot be written or locked, each decodes."""
  lock_path, waited = cache_path + ".lock", False
  while True:
    lock = None
    with contextlib.suppress(OSError):
      os.makedirs(os.path.dirname(cache_path), exist_ok=True)
      lock = open(lock_path, "a")
    if lock is None:
      yield waited
      return
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if not waited:
        logging.info("Another process is decoding %s: waiting to read its cache %s.", where,
                     cache_path)
      waited = True
      with contextlib.suppress(OSError):  # the lock lost (an NFS lock server): decoded here
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:  # a filesystem without locks
      pass
    if _same_file(lock, lock_path):
      break
    lock.close()  # its holder removed it meanwhile: a process may have locked a new one
  with lock:  # closing it unlocks
    try:
      yield waited
    finally:  # removed while locked: a process waiting on it sees that, and locks anew
      with contextlib.suppress(OSError):
        os.remove(lock_path)


def _same_file(opened: IO, path: str) -> bool:
  try:
    return os.path.samestat(os.fstat(opened.fileno()), os.stat(path))
  except FileNotFoundError:
    return False


def _decode_and_cache(folder: str, split: str, decoder: str, fingerprint: str, cache_path: str,
                      image_size: int, where: str) -> ArraySplit:
  """The split decoded, then written to `cache_path` (if it can be)."""
  logging.info("Decoding %s; the arrays will be cached in %s.", where, cache_path)
  if decoder.startswith("tfds"):
    ds, _, label = data_sources.open_split(name=None, folder=folder, split=split, data_dir=None,
                                           download=False, decode=False)
    decoded = ds.map(lambda ex: {**ex, "image": data_sources.decode_image(ex["image"])})
    tf, _ = data_sources.tf_and_tfds()
    try:
      images, labels = _to_arrays(decoded, image_size, where)
    except tf.errors.InvalidArgumentError as err:
      data_sources.raise_naming_undecodable(err, lambda: ds, where)
    class_names = tuple(label.names)
  else:
    images, labels, class_names = _decode_folder_with_pil(folder, split, image_size, where)
  labels = validate_labels(labels, len(class_names))
  # Written whole, then renamed (atomic): where the folder cannot be locked, runs race here.
  partial_path = f"{cache_path}.{socket.gethostname()}-{os.getpid()}{_PARTIAL_SUFFIX}"
  try:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    _remove_abandoned_partials(cache_path)
    np.savez(partial_path, images=images, labels=labels, class_names=np.array(class_names),
             fingerprint=np.array(fingerprint))
    os.replace(partial_path, cache_path)
  except OSError as e:  # e.g. a full disk: the arrays are decoded all the same
    logging.warning("Cannot cache the decoded %s in %s (%s); going on without the cache, so "
                    "the next run decodes it again (config.data.cache_dir sets where).", where,
                    cache_path, e.strerror or e)
  finally:  # a Ctrl-C too
    with contextlib.suppress(OSError):
      os.remove(partial_path)
  return ArraySplit(images, labels, len(class_names), class_names)


_PARTIAL_SUFFIX = ".tmp.npz"


def _remove_abandoned_partials(cache_path: str) -> None:
  """Removes the partial files of `cache_path` that a killed run left (SIGTERM or SIGKILL
  skip the clean-up; each is up to the size of the cache): this host's whose process has ended,
  and any host's untouched for a day (a writer writes on until it renames its file)."""
  host = socket.gethostname()
  for path in glob.glob(glob.escape(cache_path) + ".*" + _PARTIAL_SUFFIX):
    writer_host, _, pid = path[len(cache_path) + 1:-len(_PARTIAL_SUFFIX)].rpartition("-")
    with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
      ended = writer_host == host and pid.isdigit() and not _process_exists(int(pid))
      if ended or time.time() - os.path.getmtime(path) > 24 * 3600:
        os.remove(path)


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # signal 0: only checks
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    return True
  return True


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
  boxes), in `tfds.ImageFolder`'s order: files sorted by class, then name, then shuffled by
  `random.Random(split)`. So both decoders give the same arrays, a `max_*_examples` the same
  images, and a run the same batches. Labels index the class names sorted over all splits."""
  from PIL import Image

  data_sources.check_split_files(folder, split)  # (TF: in data_sources._scan_folder_split)
  class_names = data_sources.folder_classes(folder)
  listed = sorted((class_name, f.name, f.path)
                  for class_name, f in data_sources.split_image_files(folder, split))
  files = [(path, class_names.index(class_name)) for class_name, _, path in listed]
  random.Random(split).shuffle(files)  # as tfds.ImageFolder shuffles each split
  images, bad, undecodable = [], [], []
  for path, _ in data_sources.with_progress(files, where, len(files), count=lambda _: 1):
    try:
      with Image.open(path) as image:
        array = _pil_rgb(image)
    except (OSError, SyntaxError, ValueError):  # cut short, not an image, broken PNG chunk
      undecodable.append(path)
      continue
    if array.shape != (image_size, image_size, 3):
      bad.append(f"{os.path.basename(path)} {array.shape}")
    images.append(array)
  if undecodable:
    raise data_sources.undecodable_error(where, sorted(undecodable), len(files))
  if bad:
    raise ValueError(f"{where}: {len(bad)} of {len(files)} images are not ({image_size}, "
                     f"{image_size}, 3), e.g. {', '.join(bad[:5])}. {_IMAGE_SIZE_HINT}")
  return np.stack(images), np.array([label for _, label in files], np.int32), class_names


def _pil_rgb(image: "PIL.Image.Image") -> np.ndarray:
  """An opened image as uint8 RGB, as TensorFlow decodes it: a 16-bit greyscale PNG (Pillow's
  mode I;16, or I) keeps the high byte of each value, where `convert("RGB")` clips to 255.
  (Pillow already reads other 16-bit PNGs as TF does.)"""
  if image.mode == "I" or image.mode.startswith("I;16"):
    grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  return np.asarray(image.convert("RGB"))


def _folder_fingerprint(folder: str, split: str, decoder: str) -> str:
  """Change detector for the cache, from the listing alone: the class list, every file's class,
  name, size and mtime (a file moved to another class keeps its size and mtime), and the
  decoder that filled it."""
  files = sorted((label, f.name, f.stat().st_size, f.stat().st_mtime_ns)
                 for label, f in data_sources.split_image_files(folder, split))
  listing = hashlib.sha1(json.dumps(files).encode()).hexdigest()
  return json.dumps(dict(classes=list(data_sources.folder_classes(folder)), files=len(files),
                         listing_sha1=listing, decoder=decoder))


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
  tf, tfds = data_sources.tf_and_tfds()
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
  chunks = list(data_sources.with_progress(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)), where,
                                           total if total >= 0 else None,
                                           count=lambda c: len(c["label"])))
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
