"""Where examples come from: a tfds dataset, an image folder, or torchvision's CIFAR files.

Opens a split as this process's tf.data shard (`open_split`), checks folders before any file is
read (errors say what to change), and names the images TF cannot decode (its errors name none).
Both pipelines read through here: whole-split arrays (`input_pipeline`) and the ImageNet streams
(`imagenet_input`).

TensorFlow is imported lazily, by `tf_and_tfds`, only when data is read, and never sees the
accelerators, so the training core does not import it and it takes no GPU memory.
"""

import collections
import contextlib
import difflib
import functools
import glob
import os
import re
import socket
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import jax
from absl import logging

from sortkd_jax import torchvision_cifar

if TYPE_CHECKING:
  import ml_collections
  import tensorflow as tf


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # the files tfds.ImageFolder reads
_FOLDER_LAYOUT = "<folder>/<split>/<class_name>/<image>.jpg|.jpeg|.png"


@functools.cache
def tf_and_tfds() -> tuple[Any, Any]:
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


SYNTHETIC = "synthetic"


def stream_source(data: "ml_collections.ConfigDict") -> dict[str, Any]:
  """The source arguments (`split_info`, the ImageNet datasets) of a tf.data recipe's
  `config.data`."""
  return dict(name=data.name, folder=data.folder, data_dir=data.data_dir,
              manual_dir=data.manual_dir, download=data.download)


def split_info(*, split: str, name: str | None = None, folder: str | None = None,
               data_dir: str | None = None, manual_dir: str | None = None,
               download: bool = False) -> tuple[int, int]:
  """(number of examples, number of classes) of a split, without reading its images."""
  _, total, label = open_split(name=name, folder=folder, split=split, data_dir=data_dir,
                               download=download, manual_dir=manual_dir, decode=False)
  return total, label.num_classes


def open_split(
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
  _, tfds = tf_and_tfds()
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  shard = dict(decoders=decoders, shuffle_seed=shuffle_seed, max_examples=max_examples,
               process_index=process_index, process_count=process_count)
  if folder is not None:
    return _open_folder_split(folder, split, **shard)
  if name == SYNTHETIC:
    raise ValueError("data.name='synthetic' is random CIFAR-shaped data for the on-device "
                     "pipeline (the CIFAR configs), not for tf.data streams (ImageNet): use a "
                     "configs/cifar_*.py recipe, or give an image folder, "
                     "--config.data.folder=DIR (scripts/benchmark.py times an ImageNet recipe's "
                     "step on random data without one).")
  if name is None:
    raise ValueError("Pass a tfds dataset `name` (e.g. 'imagenet2012') or an image `folder`.")
  builder = _prepared_builder(name, data_dir, download, manual_dir)
  return _open_tfds_split(builder, split, **shard)


def _open_folder_split(folder: str, split: str, *, decoders, shuffle_seed: int | None,
                       max_examples: int | None, process_index: int,
                       process_count: int) -> tuple["tf.data.Dataset", int, Any]:
  """`open_split` of an image folder: its file list, sharded before any file is read."""
  tf, _ = tf_and_tfds()
  folder = os.path.abspath(os.path.expanduser(folder))
  check_folder_split(folder, split)
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
  return local, total, features["label"]


def _prepared_builder(name: str, data_dir: str | None, download: bool,
                      manual_dir: str | None) -> Any:
  """The tfds builder of `name`, prepared first if `download` or `manual_dir` asks for it
  (by one process: several would write the same files at once)."""
  _, tfds = tf_and_tfds()
  try:
    with _no_temporary_folders_left():
      builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    close = difflib.get_close_matches(name, tfds.list_builders(), n=3)
    raise ValueError(
        f"Unknown tfds dataset {name!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                            else "")
        + f". Use a tfds name such as cifar100 or imagenet2012, {SYNTHETIC!r} (CIFAR "
        "configs), or --config.data.folder=DIR.") from None
  if (download or manual_dir) and not builder.is_prepared():
    where = builder.data_dir_root  # data_dir, else $TFDS_DATA_DIR or ~/tensorflow_datasets
    if jax.process_count() > 1:
      raise ValueError(
          f"tfds dataset {name!r} is not prepared under data_dir={where}; prepare it once "
          f"before a multi-process run: `tfds build {name} --data_dir=DIR"
          + (f" --manual_dir={manual_dir}`" if manual_dir else "`")
          + ", then pass --config.data.data_dir=DIR.")
    elsewhere = (f"(`tfds build {name} --data_dir=DIR`) and pass --config.data.data_dir=DIR, or "
                 f"{_folder_choices(name)}")
    unreachable = None if manual_dir else _unreachable_download_host(builder)
    if unreachable:
      raise RuntimeError(
          f"Cannot download tfds dataset {name!r} to prepare it under data_dir={where}: "
          f"{unreachable}. Offline? Prepare it where there is internet {elsewhere}.")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    logging.info("Preparing tfds dataset %r under %s (once). Should its download stall (tfds "
                 "retries for minutes): Ctrl-C, and %s.", name, where, _folder_choices(name))
    try:
      builder.download_and_prepare(download_config=config)
    except Exception as err:
      why = (f"{where} cannot be written by this user (a shared one?): prepare it elsewhere"
             if isinstance(err, PermissionError) else "Offline? Prepare it where there is internet")
      raise RuntimeError(
          f"Could not download and prepare tfds dataset {name!r} under data_dir="
          f"{where} ({type(err).__name__}: {err}). {why} {elsewhere}.") from err
  return builder


def _unreachable_download_host(builder: Any, timeout_s: float = 15.0) -> str | None:
  """Why a host of `builder`'s downloads cannot be reached from here, or None: offline, tfds
  retries each download for 3.5 minutes before it fails. Nothing is checked behind a proxy
  (tfds goes through it), for datasets downloaded by hand, or under `tfds.testing.mock_data`
  (it downloads nothing)."""
  mocked = type(builder).download_and_prepare.__module__.startswith("tensorflow_datasets.testing")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS or mocked:
    return None
  proxies = urllib.request.getproxies()
  hosts = {}
  for url in getattr(builder, "url_infos", None) or {}:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and parts.hostname:
      if ((proxies.get(parts.scheme) or proxies.get("all"))
          and not urllib.request.proxy_bypass(parts.hostname)):
        return None
      hosts[parts.hostname] = parts.port or (443 if parts.scheme == "https" else 80)
  for host, port in hosts.items():
    try:
      socket.create_connection((host, port), timeout=timeout_s).close()
    except socket.gaierror as e:
      return f"this machine cannot look up {host} ({e})"
    except OSError as e:
      return f"this machine cannot connect to {host}:{port} ({str(e) or type(e).__name__})"
  return None


def _open_tfds_split(builder: Any, split: str, *, decoders,
                     shuffle_seed: int | None, max_examples: int | None, process_index: int,
                     process_count: int) -> tuple["tf.data.Dataset", int, Any]:
  """`open_split` of a prepared tfds dataset: this process's sub-split, read in part (or,
  under a `max_examples` cap, the split's first ones, then sharded)."""
  _, tfds = tf_and_tfds()
  full = _tfds_as_dataset(builder, split=split, decoders=decoders)
  if max_examples is not None:  # a smoke-test cap: the split's first ones, then sharded
    full = full.take(max_examples)
  total = _split_size(full, split, process_count)
  if max_examples is not None:
    local = full.shard(process_count, process_index)
  else:
    local = _tfds_as_dataset(
        builder,
        split=tfds.split_for_jax_process(split, process_index=process_index,
                                         process_count=process_count),
        decoders=decoders,
        shuffle_files=shuffle_seed is not None,
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
    )
  return local, total, builder.info.features["label"]


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
  tf, _ = tf_and_tfds()
  builder = _scan_folder(folder, stamp)
  check_split_files(folder, split)
  label_id = {name: i for i, name in enumerate(builder.info.features["label"].names)}
  examples = builder._split_examples[split]
  return (builder.info.features, tf.constant([e.image_path for e in examples], tf.string),
          tf.constant([label_id[e.label] for e in examples], tf.int64))


@functools.lru_cache(maxsize=1)
def _scan_folder(folder: str, stamp: tuple[tuple[str, int], ...]) -> Any:
  del stamp  # part of the cache key only
  _, tfds = tf_and_tfds()
  start = time.perf_counter()
  logging.info("Listing the files of image folder %s.", folder)
  with _no_temporary_folders_left():
    builder = tfds.ImageFolder(folder)
  logging.info("Image folder %s: %s in %.1f s.", folder, ", ".join(
      f"{split} {info.num_examples:,} files" for split, info in builder.info.splits.items()),
      time.perf_counter() - start)
  return builder


@contextlib.contextmanager
def _no_temporary_folders_left() -> Iterator[None]:
  """Removes the empty `/tmp/tmp*tfds` folder that a tfds builder of data not prepared (an image
  folder's, always) makes and leaves (`DatasetInfo.initialize_from_bucket`, with GCS off): one a
  run, thousands on a machine over time. Only this user's empty ones made meanwhile go (rmdir
  leaves others); tfds fills one only with GCS on, which it is not by default."""
  pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
  before = set(glob.glob(pattern))
  try:
    yield
  finally:
    for path in set(glob.glob(pattern)) - before:
      with contextlib.suppress(OSError):
        if os.stat(path).st_uid == os.getuid():
          os.rmdir(path)


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


def _tfds_as_dataset(builder: Any, **kwargs: Any) -> Any:
  """`builder.as_dataset`, turning tfds' "could not find data" into guidance."""
  try:
    return builder.as_dataset(**kwargs)
  except Exception as err:
    if builder.is_prepared():
      raise
    raise FileNotFoundError(
        f"tfds dataset {builder.name!r} is not prepared under data_dir={builder.data_dir_root}. "
        f"Either prepare it once where there is internet (`tfds build {builder.name} "
        "--data_dir=DIR`; ImageNet needs `--manual_dir` holding the ILSVRC2012 tars) and pass "
        "--config.data.data_dir=DIR, or "
        f"{_folder_choices(builder.name)}."
    ) from err


def check_folder_split(folder: str, split: str) -> None:
  """Fails early, with what to change, on a missing or empty split or mismatched classes."""
  try:  # else a bare codec error, or tf.data's "Error converting unicode string"
    folder.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError(f"The image folder {folder!r} is not UTF-8 text, which TensorFlow's "
                     "reader needs: rename it.") from None
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
  if next(split_image_files(folder, split), None) is None:
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
            and next(split_image_files(folder, s), None) is not None]
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


def folder_classes(folder: str) -> tuple[str, ...]:
  """The class names of an image folder, sorted over all splits (as `tfds.ImageFolder`)."""
  return tuple(sorted(set().union(*_split_classes(folder).values())))


def _split_classes(folder: str) -> dict[str, set[str]]:
  """{split: its class folder names} for every sub-folder (each is a split to tfds)."""
  return {s.name: {c.name for c in os.scandir(s.path) if c.is_dir()}
          for s in os.scandir(folder) if s.is_dir()}


def check_split_files(folder: str, split: str) -> None:
  """Refuses folders in a class folder that are named like images (`x.jpg/`: TensorFlow's
  reader would fail on them mid-run), and logs what of the split is not read (files that are
  not images, e.g. .webp; files beside the class folders; sub-folders of class folders) and
  its classes without images."""
  not_images, loose, nested, named_like_images = [], [], [], []
  images = collections.Counter()
  for class_dir in os.scandir(os.path.join(folder, split)):
    if not class_dir.is_dir():
      loose.append(class_dir.path)
      continue
    for f in os.scandir(class_dir.path):
      if not f.name.lower().endswith(_IMAGE_EXTENSIONS):
        (nested if f.is_dir() else not_images).append(f.path)
      elif f.is_dir():
        named_like_images.append(f.path)
      else:  # a file, or a link that only the process reading it finds broken (TF names it)
        images[class_dir.name] += 1
  if named_like_images:
    raise ValueError(f"Image folder {folder}, split {split!r}: {len(named_like_images)} folders "
                     f"are named like images, e.g. {sorted(named_like_images)[0]}; rename or "
                     "remove them.")
  where = f"image folder {folder}, split {split!r}"
  if not_images:
    logging.warning("Skipping %d files of %s that are not %s, e.g. %s.", len(not_images), where,
                    "/".join(_IMAGE_EXTENSIONS), sorted(not_images)[0])
  if loose:
    logging.warning("Skipping %d files of %s that are not in a class folder, e.g. %s.",
                    len(loose), where, sorted(loose)[0])
  if nested:  # torchvision's ImageFolder, which mdistiller uses, reads sub-folders too
    logging.warning("Skipping the %d sub-folders of class folders of %s, e.g. %s: only the "
                    "images directly in a class folder are read (unlike torchvision's "
                    "ImageFolder); move their images up to train on them.", len(nested), where,
                    sorted(nested)[0])
  classes = folder_classes(folder)
  empty = [c for c in classes if not images[c]]
  if empty:
    logging.warning("%d of the %d classes have no images in %s: %s.", len(empty), len(classes),
                    where, ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
  if len(classes) == 1 and split == "train":
    logging.warning("Image folder %s has a single class, %s: every prediction is right and "
                    "nothing is learned. config.data.folder is the dataset's root, holding "
                    "train/<class>/ and test/<class>/.", folder, classes[0])


def split_image_files(folder: str, split: str) -> Iterator[tuple[str, os.DirEntry]]:
  """(class name, file) for every image of `<folder>/<split>/<class>/`. Closed when left
  unfinished too (a check reads only the first), with no 'unclosed scandir' ResourceWarning."""
  with os.scandir(os.path.join(folder, split)) as class_dirs:
    for class_dir in class_dirs:
      if class_dir.is_dir():
        with os.scandir(class_dir.path) as files:
          for f in files:
            if f.name.lower().endswith(_IMAGE_EXTENSIONS):
              yield class_dir.name, f


def decode_image(encoded: Any) -> Any:
  """Encoded bytes to uint8 [H, W, 3]; JPEGs with the exact IDCT, so pixels equal PIL's.

  torchvision reads ImageNet through PIL; TF's default fast IDCT is about 1 grey level off."""
  tf, _ = tf_and_tfds()
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


# Features naming an example's file: tfds.ImageFolder's (the path) and imagenet2012's.
_FILE_NAME_FEATURES = ("image/filename", "file_name")


def _undecodable_examples(ds: "tf.data.Dataset", where: str) -> tuple[list[str], int]:
  """(names of the examples of `ds` whose image `decode_image` rejects, examples checked).

  An example is named by its file name feature if it has one, else by its index in `ds`. The
  records are read as they are, so a reader error (a corrupt record file) raises as itself, and
  decoded in chunks from memory, where skipping a failed decode is safe (`ignore_errors` on a
  failing reader retries it forever).
  """
  tf, _ = tf_and_tfds()
  total = int(ds.cardinality())
  key = next((k for k in _FILE_NAME_FEATURES if k in ds.element_spec), None)
  chunks = ds.map(lambda ex: (ex["image"], ex[key] if key else "")).batch(1024).prefetch(1)
  bad, start = [], 0
  for images, names in with_progress(chunks.as_numpy_iterator(), where, total,
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


def raise_naming_undecodable(err: Exception, records: Callable[[], "tf.data.Dataset"],
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
  raise undecodable_error(where, bad, total, fix) from err


def undecodable_error(where: str, paths: list[str], total: int,
                      fix: str = "Replace or remove them.") -> ValueError:
  """One message naming the files that cannot be decoded, so they can be fixed or removed."""
  shown = ", ".join(paths[:10]) + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")
  return ValueError(f"{where}: {len(paths)} of {total} image files cannot be decoded (corrupt, "
                    f"cut short, or not an image): {shown}. {fix}")


def with_progress(items: Iterable[Any], where: str, total: int | None, *,
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
