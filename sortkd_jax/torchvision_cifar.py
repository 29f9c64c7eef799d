"""CIFAR's pickled "python version" folders, as torchvision unpacks them: mdistiller's own data.

mdistiller reads CIFAR-100 with `torchvision.datasets.CIFAR100(root, download=True)` (spec §7.3),
which leaves `<root>/cifar-100-python/` (pickled `train`, `test`, `meta`); CIFAR-10's folder is
`cifar-10-batches-py/`. Given as `config.data.folder`, such a folder gives the very arrays
mdistiller trains on, without TensorFlow, Pillow or a download. Each row of a file's `data` is one
image: 1024 red, 1024 green, then 1024 blue bytes, each plane row-major.

The files were written by Python 2 with NumPy 1. They are read by an unpickler that never hands
NumPy anything from the file: the three names a CIFAR file uses (`numpy.core.multiarray.
_reconstruct`, `numpy.ndarray`, `numpy.dtype`) are stand-ins that accept only a uint8 array's
pickle, and everything else builds dicts, lists, strings and numbers. So a file cannot run code
or make NumPy read memory outside its own bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where one CIFAR variant keeps its splits, labels and class names."""
  folder: str  # the folder's name as torchvision unpacks it
  archive: str  # the download that unpacks into it
  meta_file: str
  class_names_key: str
  labels_key: str
  split_files: dict[str, tuple[str, ...]]


LAYOUTS = (
    Layout("cifar-100-python", "cifar-100-python.tar.gz", "meta", "fine_label_names",
           "fine_labels", {"train": ("train",), "test": ("test",)}),
    Layout("cifar-10-batches-py", "cifar-10-python.tar.gz", "batches.meta", "label_names",
           "labels", {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                      "test": ("test_batch",)}),
)


def layout_of(folder: str) -> Layout | None:
  """The layout of `folder` if it is a torchvision CIFAR folder: its meta file, and no `train/`
  directory (an image folder may hold a file named `meta`)."""
  if os.path.isdir(os.path.join(folder, "train")):
    return None
  for layout in LAYOUTS:
    if os.path.isfile(os.path.join(folder, layout.meta_file)):
      return layout
  return None


# Stand-ins for the three globals of a pickled NumPy 1 uint8 array.
_NOT_UINT8 = "it holds a NumPy array other than a plain uint8 one"


class _NdarrayName:
  """`numpy.ndarray`, which `_reconstruct` takes as its class."""


class _Uint8Dtype:
  """`numpy.dtype('u1', 0, 1)` and its pickled state, nothing else."""

  def __init__(self, code: Any, align: Any, copy: Any):
    if (code, align, copy) != ("u1", 0, 1):
      raise pickle.UnpicklingError(_NOT_UINT8)

  def __setstate__(self, state: Any) -> None:
    if state != (3, "|", None, None, None, -1, -1, 0):
      raise pickle.UnpicklingError(_NOT_UINT8)


class _Uint8Array:
  """What `_reconstruct(ndarray, (0,), 'b')` starts; its pickled state gives its bytes."""

  def __setstate__(self, state: Any) -> None:
    version, shape, dtype, fortran, raw = state
    if (version != 1 or not isinstance(dtype, _Uint8Dtype) or not isinstance(fortran, bool)
        or not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape)
        or not isinstance(raw, (str, bytes)) or len(raw) != math.prod(shape)):
      raise pickle.UnpicklingError(_NOT_UINT8)
    raw = raw.encode("latin1") if isinstance(raw, str) else raw  # Python 2's byte string
    self.array = np.frombuffer(raw, np.uint8).reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Uint8Array:
  if cls is not _NdarrayName or shape != (0,) or typecode != "b":
    raise pickle.UnpicklingError(_NOT_UINT8)
  return _Uint8Array()


_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): _NdarrayName, ("numpy", "dtype"): _Uint8Dtype}


class _CifarUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _GLOBALS:
      raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never does")
    return _GLOBALS[module, name]


def _read(path: str, layout: Layout) -> dict[str, Any]:
  """One pickled file's dict, its arrays as NumPy arrays. Python 2 wrote its strings as bytes:
  latin-1 makes them str, as torchvision reads them."""
  fix = f"unpack {layout.archive} again"
  try:
    with open(path, "rb") as f:
      content = _CifarUnpickler(f, encoding="latin1").load()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is missing from the CIFAR folder: {fix}.") from None
  except Exception as e:  # whatever a damaged pickle raises: only the stand-ins above ran
    raise ValueError(f"Cannot read {path} as a CIFAR file ({type(e).__name__}: {e}); it is "
                     f"damaged or cut short: {fix}.") from None
  if not isinstance(content, dict):
    raise ValueError(f"{path} holds a {type(content).__name__}, not a CIFAR file's dict: {fix}.")
  return {k: v.array if isinstance(v, _Uint8Array) else v for k, v in content.items()}


def read_split(folder: str, layout: Layout, split: str
               ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """(uint8 images [N, H, W, 3], labels [N], class names) of `split` ('train' or 'test') of a
  `layout` folder, the examples in the files' order (the train batches one after another)."""
  if split not in layout.split_files:
    raise ValueError(f"A torchvision CIFAR folder has the splits {sorted(layout.split_files)}, "
                     f"not {split!r} ({folder}): set config.data.train_split=train and "
                     "config.data.test_split=test.")
  meta_path = os.path.join(folder, layout.meta_file)
  class_names = _read(meta_path, layout).get(layout.class_names_key)
  if not (isinstance(class_names, list) and class_names
          and all(isinstance(n, str) for n in class_names)):
    raise ValueError(f"{meta_path} has no list of class names {layout.class_names_key!r}: "
                     f"unpack {layout.archive} again.")
  images, labels = [], []
  for name in layout.split_files[split]:
    path = os.path.join(folder, name)
    batch = _read(path, layout)
    data, batch_labels = batch.get("data"), batch.get(layout.labels_key)
    whole = (isinstance(data, np.ndarray) and data.ndim == 2 and isinstance(batch_labels, list)
             and len(batch_labels) == len(data) and all(type(y) is int for y in batch_labels))
    side = math.isqrt(data.shape[1] // 3) if whole else 0
    if side == 0 or data.shape[1] != 3 * side * side:
      raise ValueError(f"{path} does not hold uint8 'data' [N, 3·H·W] and a list of N integer "
                       f"{layout.labels_key!r}: unpack {layout.archive} again.")
    outside = [y for y in batch_labels if not 0 <= y < len(class_names)]
    if outside:
      raise ValueError(f"{path} has {len(outside)} labels outside the {len(class_names)} classes "
                       f"of {meta_path} (e.g. {outside[0]}): unpack {layout.archive} again.")
    images.append(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
    labels.append(np.array(batch_labels, np.int64))
  return (np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels),
          tuple(class_names))
