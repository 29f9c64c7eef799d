"""CIFAR's pickled "python version" folders, as torchvision unpacks them: mdistiller's own data.

mdistiller reads CIFAR-100 with `torchvision.datasets.CIFAR100(root, download=True)` (spec §7.3),
which leaves `<root>/cifar-100-python/` (pickled `train`, `test`, `meta`); CIFAR-10's folder is
`cifar-10-batches-py/`. Given as `config.data.folder`, such a folder gives the very arrays
mdistiller trains on, without TensorFlow, Pillow or a download. Each row of a file's `data` is one
image: 1024 red, 1024 green, then 1024 blue bytes, each plane row-major.

The files are pickles. They are read by an unpickler that builds nothing but containers, strings,
numbers and NumPy arrays, so a file from elsewhere cannot run code when it is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where one CIFAR variant keeps its splits, labels and class names."""
  archive: str  # the download that unpacks into the folder
  meta_file: str
  class_names_key: str
  labels_key: str
  split_files: dict[str, tuple[str, ...]]


LAYOUTS = {
    "cifar-100-python": Layout("cifar-100-python.tar.gz", "meta", "fine_label_names",
                               "fine_labels", {"train": ("train",), "test": ("test",)}),
    "cifar-10-batches-py": Layout("cifar-10-python.tar.gz", "batches.meta", "label_names",
                                  "labels", {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                                             "test": ("test_batch",)}),
}

# The only globals a CIFAR file names: those of a pickled NumPy array (numpy.core before NumPy 2).
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ARRAY_GLOBALS:
      raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never does")
    return _ARRAY_GLOBALS[module, name]


def layout_of(folder: str) -> Layout | None:
  """The layout of `folder` if it is a torchvision CIFAR folder (found by its meta file)."""
  for layout in LAYOUTS.values():
    if os.path.isfile(os.path.join(folder, layout.meta_file)):
      return layout
  return None


def _read(path: str, layout: Layout) -> dict[str, Any]:
  """One pickled file's dict. Python 2 wrote its strings as bytes: latin-1 makes them str (and
  NumPy takes the array bytes back from such a str, as torchvision reads them)."""
  fix = f"unpack {layout.archive} again"
  try:
    with open(path, "rb") as f:
      content = _ArrayUnpickler(f, encoding="latin1").load()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is missing from the CIFAR folder: {fix}.") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
    raise ValueError(f"Cannot read {path} as a CIFAR file ({type(e).__name__}: {e}); it is "
                     f"damaged or cut short: {fix}.") from None
  if not isinstance(content, dict):
    raise ValueError(f"{path} holds a {type(content).__name__}, not a CIFAR file's dict: {fix}.")
  return content


def read_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """(uint8 images [N, H, W, 3], labels [N], class names) of `split` ('train' or 'test'), the
  examples in the files' order (the train batches one after another)."""
  layout = layout_of(folder)
  if layout is None:
    raise ValueError(f"{folder} is not a torchvision CIFAR folder ({' or '.join(LAYOUTS)}).")
  if split not in layout.split_files:
    raise ValueError(f"A torchvision CIFAR folder has the splits {sorted(layout.split_files)}, "
                     f"not {split!r} ({folder}).")
  meta = _read(os.path.join(folder, layout.meta_file), layout)
  class_names = tuple(meta.get(layout.class_names_key, ()))
  if not class_names:
    raise ValueError(f"{os.path.join(folder, layout.meta_file)} has no "
                     f"{layout.class_names_key!r}: unpack {layout.archive} again.")
  images, labels = [], []
  for name in layout.split_files[split]:
    path = os.path.join(folder, name)
    batch = _read(path, layout)
    data, batch_labels = batch.get("data"), batch.get(layout.labels_key)
    side = int(round((np.shape(data)[-1] / 3) ** 0.5)) if np.ndim(data) == 2 else 0
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or side == 0
        or data.shape[1] != 3 * side * side or batch_labels is None
        or len(batch_labels) != len(data)):
      raise ValueError(f"{path} does not hold uint8 'data' [N, 3·H·W] and N "
                       f"{layout.labels_key!r}: unpack {layout.archive} again.")
    images.append(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
    labels.append(np.asarray(batch_labels))
  return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), class_names
