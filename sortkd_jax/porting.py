"""PyTorch → Flax porting of mdistiller weights (spec §6 and §9, item 1).

The NNX models of ``sortkd_jax.models`` keep PyTorch's module names, so every variable's
state path *is* its torch key after a leaf rename (spec §9, item 1):

=================  =====================  ===========================================
NNX path leaf      torch key leaf         layout
=================  =====================  ===========================================
conv ``kernel``    ``weight``             [O, I/g, kh, kw] → [kh, kw, I/g, O]
linear ``kernel``  ``weight``             [out, in] → [in, out]
``bias``           ``bias``               same
BN ``scale``       ``weight``             same
BN ``mean``        ``running_mean``       same (torch's buffer, copied verbatim)
BN ``var``         ``running_var``        same (torch's *unbiased* buffer, verbatim)
=================  =====================  ===========================================

``num_batches_tracked`` is accepted and ignored. ``('layer1', 0, 'conv1', 'kernel')`` ↔
``layer1.0.conv1.weight``. The way back, Flax → PyTorch: ``export_state_dict`` and
``save_torch_file`` (a file mdistiller loads).

torch is optional: only ``load_torch_state_dict`` and ``save_torch_file`` import it (CPU build
is enough).
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import shlex
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sortkd_jax import checkpoint
from sortkd_jax import models

__all__ = [
    "PortingError",
    "TorchFileError",
    "port_state_dict",
    "infer_arch",
    "load_torch_state_dict",
    "torch_key_shapes",
    "nnx_path_to_torch_key",
    "export_state_dict",
    "save_torch_file",
]

_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_MAX_LISTED = 25


class PortingError(ValueError):
  """A state dict does not fit the requested architecture.

  Attributes:
    missing: torch keys the model needs that the state dict lacks.
    unexpected: state-dict keys the model has no place for.
    mismatched: ``(key, expected_torch_shape, got_shape)`` triples.
    checkpoint_classes: the checkpoint's class count when only that disagrees, else None.
  """

  def __init__(self, message: str, *, missing: Iterable[str] = (),
               unexpected: Iterable[str] = (),
               mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
               checkpoint_classes: int | None = None):
    super().__init__(message)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    self.checkpoint_classes = checkpoint_classes


class TorchFileError(ValueError):
  """A ``.pth`` file is missing, unreadable or not a state-dict container."""


# --------------------------------------------------------------------------------------
# Key translation.
# --------------------------------------------------------------------------------------


def nnx_path_to_torch_key(path: tuple) -> str:
  """``('layer1', 0, 'conv1', 'kernel')`` → ``'layer1.0.conv1.weight'``."""
  *prefix, leaf = path
  if leaf not in _LEAF_TO_TORCH:
    raise ValueError(f"No torch name for NNX variable {path!r} (leaf {leaf!r}).")
  return ".".join([*map(str, prefix), _LEAF_TO_TORCH[leaf]])


# Flax layout → torch layout, by rank: conv [kh, kw, I/g, O] → [O, I/g, kh, kw]; linear
# [in, out] → [out, in]; vectors as they are. The inverse is the argsort of each order.
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}


def _torch_shape(nnx_shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(nnx_shape[i] for i in _TO_TORCH_AXES[len(nnx_shape)])


def _to_nnx_layout(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, np.argsort(_TO_TORCH_AXES[a.ndim]))


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, _TO_TORCH_AXES[a.ndim])


def _table(model: nnx.Module) -> dict[str, tuple[str, tuple, tuple[int, ...]]]:
  """torch key → (collection, NNX path, NNX shape), in the model's state order."""
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  table = {}
  for coll, state in (("params", params), ("batch_stats", stats)):
    for path, var in nnx.to_flat_state(state):
      table[nnx_path_to_torch_key(path)] = (coll, tuple(path), tuple(var.shape))
  return table


def torch_key_shapes(model_or_name: nnx.Module | str, num_classes: int | None = None
                     ) -> dict[str, tuple[int, ...]]:
  """The torch state-dict keys (without ``num_batches_tracked``) and torch-layout shapes
  that a model of this architecture holds, in the model's state order."""
  if isinstance(model_or_name, str):
    return dict(_named_key_shapes(model_or_name, num_classes))
  return {k: _torch_shape(shape) for k, (_, _, shape) in _table(model_or_name).items()}


@functools.lru_cache(maxsize=None)
def _named_key_shapes(name: str, num_classes: int | None):
  return tuple(torch_key_shapes(models.abstract_model(name, num_classes)).items())


def num_classes_of(model: nnx.Module) -> int:
  """The classifier width: the output size of the model's only 2-D (Linear) weight."""
  return next(s[0] for s in torch_key_shapes(model).values() if len(s) == 2)


def _classifier_key(name: str) -> str:
  """The torch key of the classifier weight (the model's only 2-D kernel)."""
  keys = [k for k, s in torch_key_shapes(name).items() if len(s) == 2]
  assert len(keys) == 1, keys
  return keys[0]


# --------------------------------------------------------------------------------------
# State dict → model.
# --------------------------------------------------------------------------------------


def _as_numpy(value: Any, key: str) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith("torch"):  # a torch.Tensor; no torch import needed
    if getattr(value, "is_meta", False):
      raise TorchFileError(
          f"State-dict entry {key!r} is a tensor on torch's 'meta' device, which holds a shape "
          "but no values: save the model again after its weights are loaded or initialised.")
    t = value.detach().cpu()
    if t.is_floating_point():
      t = t.float()  # bf16/fp16 checkpoints; numpy has no bfloat16
    return t.numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # pragma: no cover - defensive
    raise PortingError(f"State-dict entry {key!r} is not an array ({type(value).__name__}).") from e


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  if sd and all(k.startswith(prefix) for k in sd):
    return {k[len(prefix):]: v for k, v in sd.items()}
  return dict(sd)


def _natural(key: str) -> list:
  """Sort key putting ``layer1.2`` before ``layer1.10``."""
  return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def _listing(title: str, items: list[str]) -> list[str]:
  if not items:
    return []
  lines = [f"  {title}:"]
  lines += [f"    {it}" for it in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
  return lines


def _archs_with_keys(keys: set[str]) -> Iterator[str]:
  """The registry names whose torch key set equals ``keys`` (one at most: each has its own)."""
  return (name for name in models.MODEL_NAMES if set(torch_key_shapes(name)) == keys)


def infer_arch(state_dict: Mapping[str, Any]) -> str:
  """The architecture of a state dict that does not name it: each of the 27 has its own set of
  torch keys (``tests/test_porting.py`` checks), so the keys alone decide; shapes are then
  checked by ``port_state_dict`` as always. The first call builds the key tables (seconds).

  Raises:
    PortingError: no architecture has exactly these keys.
  """
  sd = _strip_prefix(state_dict, "module.")
  keys = {k for k in sd if not k.endswith(".num_batches_tracked")}
  arch = next(_archs_with_keys(keys), None)
  if arch is None:
    listed = sorted(keys, key=_natural)
    raise PortingError(
        f"No architecture has exactly the {len(keys)} keys of this state dict (first: "
        f"{', '.join(listed[:3])}{', ...' if len(listed) > 3 else ''}): name it with --arch "
        "to see what is missing or extra.")
  return arch


def port_state_dict(name: str, state_dict: Mapping[str, Any], num_classes: int | None = None,
                    *, dtype: jnp.dtype = jnp.float32) -> nnx.Module:
  """Builds ``name`` holding exactly the weights of a PyTorch ``state_dict``, in eval mode.

  Args:
    name: a ``sortkd_jax.models.MODEL_NAMES`` architecture.
    state_dict: torch key → NumPy array or torch tensor, e.g. mdistiller's
      ``ckpt["model"]``. A DataParallel ``module.`` prefix is accepted;
      ``num_batches_tracked`` is optional and ignored.
    num_classes: the classifier width; None infers it from the classifier weight.
    dtype: compute dtype of the returned model (weights stay float32).

  Raises:
    PortingError: strict loading failed (lists missing keys, unexpected keys and shape
      mismatches), or ``num_classes`` disagrees with the checkpoint.
  """
  models.check_name(name, "architecture")
  sd = _strip_prefix(state_dict, "module.")

  cls_key = _classifier_key(name)
  if cls_key in sd:
    got = int(np.shape(sd[cls_key])[0]) if np.ndim(sd[cls_key]) == 2 else None
    if num_classes is None:
      num_classes = got
    elif got is not None and got != num_classes:
      raise PortingError(
          f"The checkpoint's classifier {cls_key!r} has {got} classes but num_classes="
          f"{num_classes} was requested for {name!r}. Pass num_classes={got} (or "
          f"--num-classes {got}), or use a checkpoint trained with {num_classes} classes.",
          mismatched=[(cls_key, (num_classes,), (got,))], checkpoint_classes=got)

  abstract = models.abstract_model(name, num_classes)
  table = _table(abstract)

  missing = sorted((k for k in table if k not in sd), key=_natural)
  unexpected, mismatched = [], []
  arrays: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    if key.endswith(".num_batches_tracked") and (
        key[:-len("num_batches_tracked")] + "running_mean") in table:
      continue
    if key not in table:
      unexpected.append(key)
      continue
    a = _as_numpy(value, key)
    expected = _torch_shape(table[key][2])
    if tuple(a.shape) != expected:
      mismatched.append((key, expected, tuple(a.shape)))
      continue
    arrays[key] = a

  if missing or unexpected or mismatched:
    lines = [
        f"Cannot port the state dict into {name!r}"
        f"{'' if num_classes is None else f' with {num_classes} classes'}: "
        f"{len(missing)} missing key(s), {len(unexpected)} unexpected key(s), "
        f"{len(mismatched)} shape mismatch(es)."
    ]
    lines += _listing("missing keys (the model has them, the state dict does not)", missing)
    lines += _listing("unexpected keys (in the state dict, not in the model)",
                      sorted(unexpected, key=_natural))
    lines += _listing("shape mismatches (key: expected torch shape, got)",
                      [f"{k}: expected {tuple(e)}, got {tuple(g)}" for k, e, g in mismatched])
    if missing or unexpected:
      given = {k for k in sd if not k.endswith(".num_batches_tracked")}
      archs = [a for a in _archs_with_keys(given) if a != name]
      if archs:
        lines.append(f"  The keys match architecture(s) {archs}: use that name "
                     "(--arch of the scripts, --config.teacher.name of a run).")
      elif any(k.startswith(("student.", "teacher.")) for k in unexpected):
        lines.append("  These are a distiller's keys (student./teacher.): port one component "
                     "(load_torch_state_dict(path, component) or --component).")
      else:
        lines.append("  Check the architecture name.")
    raise PortingError("\n".join(lines), missing=missing, unexpected=unexpected,
                       mismatched=mismatched)

  pure = {"params": {}, "batch_stats": {}}
  for key, (coll, path, _) in table.items():
    node = pure[coll]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(_to_nnx_layout(arrays[key]).astype(np.float32))
  return models.model_from_pure_dicts(name, num_classes, pure["params"], pure["batch_stats"],
                                      dtype=dtype)


def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The inverse of ``port_state_dict``: torch key → NumPy array in torch layout
  (``num_batches_tracked`` omitted). Useful to load JAX-trained weights in mdistiller."""
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  out = {}
  for state in (params, stats):
    for path, var in nnx.to_flat_state(state):
      out[nnx_path_to_torch_key(path)] = _to_torch_layout(np.asarray(var[...]))
  return out


def save_torch_file(path: str | os.PathLike, model: nnx.Module) -> int:
  """Writes ``model`` as mdistiller's ``student_best`` holds a student: ``{"model":
  state_dict}``, torch layout, with the ``num_batches_tracked`` buffers (0: torch's
  BatchNorm2d uses it only without a momentum) that a strict ``load_state_dict`` expects.
  The file appears whole or not at all, its folder made if need be (as `save_model` makes a
  model's). Returns the number of tensors written."""
  torch = _import_torch()
  state_dict = {}
  for key, value in export_state_dict(model).items():
    state_dict[key] = torch.tensor(value)  # a copy: the arrays may be read-only views
    if key.endswith(".running_var"):
      state_dict[key.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0)
  serialized = io.BytesIO()  # written by Python: torch's writer words ENOSPC "unexpected pos"
  torch.save({"model": state_dict}, serialized)
  path = checkpoint.write_target(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = checkpoint.temp_beside(path, directory=False)
  with checkpoint.full_disk_explained(path):
    try:
      with open(tmp, "wb") as f:
        f.write(serialized.getbuffer())
      os.chmod(tmp, checkpoint.as_umask_allows(0o666))
      os.replace(tmp, path)
    except BaseException:
      os.remove(tmp)
      raise
  return len(state_dict)


# --------------------------------------------------------------------------------------
# Reading PyTorch files.
# --------------------------------------------------------------------------------------


def _import_torch():
  try:
    import torch  # noqa: PLC0415 - optional dependency
  except ImportError as e:
    raise ImportError(
        "Reading or writing PyTorch .pth files needs torch: `pip install torch` (the CPU "
        "build is enough, e.g. `pip install torch --index-url "
        "https://download.pytorch.org/whl/cpu`), or convert the file with scripts/port_weights.py "
        "where torch is installed and use the converted checkpoint.") from e
  return torch


def _is_tensor_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and len(obj) > 0 and all(
      isinstance(k, str) and (isinstance(v, np.ndarray) or type(v).__module__.startswith("torch"))
      for k, v in obj.items())


_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a legacy torch.save file


class _GlobalRefused(pickle.UnpicklingError):
  pass


class _NoGlobalsUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str) -> Any:
    raise _GlobalRefused(f"{module}.{name}")


# The members of a file in torch.save's oldest format, a tar archive (PyTorch before 0.4).
_TORCH_TAR_MEMBERS = frozenset({"pickle", "storages", "tensors"})


def _tar_members(path: str) -> list[str] | None:
  """The names in a tar archive (compressed or not), or None for any other file."""
  try:
    with tarfile.open(path) as tar:
      return tar.getnames()
  except (tarfile.TarError, OSError, EOFError):
    return None


def _archive_error(path: str, members: list[str]) -> TorchFileError:
  """For an archive of checkpoints (say, mdistiller's cifar_teachers.tar) given as one."""
  inside = [m for m in members if m.endswith((".pth", ".pt", ".pth.tar", ".ckpt"))]
  example = f" (it holds {len(inside)}, e.g. {inside[0]})" if inside else ""
  return TorchFileError(f"{path!r} is a tar archive, not a PyTorch checkpoint: unpack it (tar -xf "
                        f"{path}) and pass one of the checkpoint files inside{example}.")


def _check_torch_zip(path: str) -> None:
  """Refuses a zip that torch.save did not write (every one holds `<name>/data.pkl`), e.g. a
  NumPy .npz of a state dict, which torch.load calls corrupt."""
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError):
    return  # damaged: torch.load says how
  if any(name.endswith("/data.pkl") for name in names):
    return
  npz = bool(names) and all(name.endswith(".npy") for name in names)
  raise TorchFileError(
      f"{path!r} is a zip archive, not a torch.save file (it holds {', '.join(names[:3])}"
      f"{', ...' if len(names) > 3 else ''})." + (
          " A NumPy .npz of a state dict ports in Python: sortkd_jax.porting.port_state_dict("
          "ARCH, dict(numpy.load(path))), then checkpoint.save_model." if npz else ""))


def _file_format(path: str) -> str:
  """'zip' (torch.save), 'legacy' (torch.save before 1.6 or with the old format), 'pickle' (a
  plain Python pickle, which torch.load cannot read) or 'other' (not a pickle: corrupt, or
  something else). Reads the first pickled object without resolving any global, so nothing in
  the file runs."""
  with open(path, "rb") as f:
    if f.read(2) == b"PK":
      return "zip"
    f.seek(0)
    try:
      first = _NoGlobalsUnpickler(f).load()
    except _GlobalRefused:  # a pickle that names a class: not torch's legacy header
      return "pickle"
    except Exception:  # truncated, or no pickle at all
      return "other"
  return "legacy" if isinstance(first, int) and first == _LEGACY_TORCH_MAGIC else "pickle"


def _unpickler_detail(message: str) -> str:
  """The informative line of torch's long 'Weights only load failed' message."""
  lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
  for i, ln in enumerate(lines):
    if "WeightsUnpickler error" in ln:
      rest = ln.split("WeightsUnpickler error", 1)[1].lstrip(": ").strip()
      rest = rest or (lines[i + 1] if i + 1 < len(lines) else ln)
      # Drop torch's advice to allowlist the global in Python: the caller's options follow.
      return re.split(r"\.? Please use `?torch\.serialization", rest)[0]
  return lines[-1] if lines else "unknown error"


def _trusted_load(path: str, load: Callable[[], Any]) -> Any:
  """``load()``, which may unpickle any class, with a missing class named as such."""
  try:
    return load()
  except (ImportError, AttributeError) as e:  # the file is fine; a class in it is not found
    raise TorchFileError(
        f"{path!r} pickles a Python class that cannot be imported here ({e}): put the code "
        "that saved it on PYTHONPATH, or save its state_dict() alone and port that.") from e
  except Exception as e:
    raise TorchFileError(f"{path!r} is not a readable PyTorch checkpoint ({e}).") from e


def _unpickle(torch: Any, path: str, trust_pickle: bool) -> Any:
  """The object in a torch.save file, or in a plain pickle when trusted; tensors stay on CPU."""
  if_trusted = ("If you trust the file, convert it once with `python scripts/port_weights.py "
                f"--src {shlex.quote(path)} --dst DIR --trust_pickle` and use DIR instead (in "
                "Python: trust_pickle=True).")
  kind = _file_format(path)
  if kind == "zip":
    _check_torch_zip(path)
  if kind == "other" and (members := _tar_members(path)) is not None:
    if not _TORCH_TAR_MEMBERS <= set(members):
      raise _archive_error(path, members)
    if not trust_pickle:  # torch.load reads this format only with weights_only=False
      raise TorchFileError(f"{path!r} is in torch.save's oldest format (a tar archive, PyTorch "
                           f"before 0.4), which torch.load reads only by unpickling whatever "
                           f"it holds. {if_trusted}")
    return _trusted_load(path, lambda: torch.load(path, map_location="cpu", weights_only=False))
  if kind == "pickle":  # torch.load cannot read these at all
    if not trust_pickle:
      raise TorchFileError(f"{path!r} is a plain Python pickle, not a torch.save file, and "
                           f"reading it may run code it holds. {if_trusted}")

    def load_pickle() -> Any:
      with open(path, "rb") as f:
        return pickle.load(f)
    return _trusted_load(path, load_pickle)
  try:
    with warnings.catch_warnings():  # a non-torch pickle warns before it fails, misleadingly
      warnings.filterwarnings("ignore", message="Detected pickle protocol")
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    detail = _unpickler_detail(str(e))
    refused = ("unsupported global", "unsupported operand")  # a class; a pickle protocol >= 4
    if not any(r in detail.lower() for r in refused) or _file_format(path) == "other":
      raise TorchFileError(
          f"{path!r} is not a readable PyTorch checkpoint (corrupt or not a torch.save "
          f"file: {detail}). Download or copy it again.") from e
    if not trust_pickle:
      raise TorchFileError(
          f"{path!r} holds Python objects (or a pickle protocol) that "
          f"torch.load(weights_only=True) refuses to unpickle ({detail}). {if_trusted}") from e
  except Exception as e:  # truncated zip, empty file, ...
    raise TorchFileError(
        f"{path!r} is not a readable PyTorch checkpoint (corrupt or not a torch.save file: "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unexpected end of file'}"
        "). Download or copy it again.") from e
  return _trusted_load(path, lambda: torch.load(path, map_location="cpu", weights_only=False))


def load_torch_state_dict(path: str | os.PathLike, component: str | None = None, *,
                          trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint and returns a flat state dict of NumPy arrays.

  Understands (spec §6):
    * mdistiller/RepDistiller teacher files ``ckpt_epoch_240.pth``:
      ``{"model": sd, "epoch", "accuracy", "optimizer"}``;
    * mdistiller trainer files ``latest``/``best``/``epoch_N``:
      ``{"model": distiller.state_dict(), ...}`` with ``module.student.``/
      ``module.teacher.`` keys → the requested ``component``;
    * ``student_*`` files ``{"model": student_sd}``; bare state dicts (torchvision files).

  Args:
    path: the ``.pth`` file.
    component: ``"student"`` or ``"teacher"``: which half of a distiller checkpoint to
      return; None: the file's only model (a distiller checkpoint holding both halves is
      refused). A file holding a single model is refused with one: the component would be
      recorded as the model's origin, which it is not.
    trust_pickle: retry with ``weights_only=False`` if the file holds objects beyond
      tensors and plain containers, and read plain pickles (``pickle.dump`` of a state
      dict). This executes pickled code: only for trusted files.

  Raises:
    FileNotFoundError: no such file.
    TorchFileError: the file is not a readable torch checkpoint, or holds no state dict.
    ImportError: torch is not installed.
  """
  path = os.fspath(path)
  if component not in ("student", "teacher", None):
    raise ValueError(f"component must be 'student', 'teacher' or None, got {component!r}.")
  if os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is a directory; pass the checkpoint file in it (e.g. "
                            "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth).")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No such checkpoint file: {path!r}. For mdistiller's CIFAR teachers, download "
        "cifar_teachers.tar from the mdistiller GitHub release 'checkpoints' and untar it "
        "into download_ckpts/.")
  obj = _unpickle(_import_torch(), path, trust_pickle)

  if isinstance(obj, Mapping) and callable(getattr(obj.get("model"), "state_dict", None)):
    obj = dict(obj, model=obj["model"].state_dict())  # a pickled nn.Module (trust_pickle)
  elif callable(getattr(obj, "state_dict", None)):
    obj = obj.state_dict()
  if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
    sd = obj["model"]
  elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    sd = obj["state_dict"]
  elif _is_tensor_dict(obj):
    sd = obj
  else:
    keys = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise TorchFileError(
        f"{path!r} holds no state dict (expected a 'model' entry or a dict of tensors; "
        f"found {keys}).")

  sd = _strip_prefix({str(k): v for k, v in sd.items()}, "module.")
  halves = {c: {k[len(c) + 1:]: v for k, v in sd.items() if k.startswith(c + ".")}
            for c in ("student", "teacher")}
  if halves["student"] or halves["teacher"]:
    if component is None:
      if halves["student"] and halves["teacher"]:
        raise TorchFileError(
            f"{path!r} is a distiller checkpoint holding a student and a teacher: convert the "
            f"one you mean,\n  python scripts/port_weights.py --src {shlex.quote(path)} "
            "--component teacher --dst DIR\n(or --component student), and use that directory "
            "(scripts/eval.py also takes --component).")
      component = "student" if halves["student"] else "teacher"
    if not halves[component]:
      raise TorchFileError(
          f"{path!r} is a distiller checkpoint without a {component!r} component "
          f"(found {[c for c in halves if halves[c]]}).")
    sd = halves[component]
  elif component is not None:
    raise TorchFileError(f"{path!r} holds one model, not a trainer's student and teacher: leave "
                         f"the component ({component!r}, --component) out.")
  out = {}
  for k, v in sd.items():
    if not (isinstance(v, np.ndarray) or type(v).__module__.startswith("torch")):
      continue  # e.g. non-tensor extras some trainers store in state dicts
    out[k] = _as_numpy(v, k)
  if not out:
    raise TorchFileError(f"{path!r}: the state dict is empty.")
  return out
