"""Checkpoints.

Model-level checkpoints (``save_model`` / ``load_model``): one model's weights as an orbax
directory, e.g. a teacher ported from PyTorch by ``scripts/port_weights.py``::

    DIR/
      state/               orbax StandardCheckpointer: {'params': ..., 'batch_stats': ...}
      sortkd_model.json    {"format": "sortkd_model", "arch", "num_classes", ...}

The directory is assembled under a temporary sibling name and renamed into place, so a
crash never leaves a directory at DIR that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sortkd_jax import models

MODEL_JSON = "sortkd_model.json"
MODEL_FORMAT = "sortkd_model"
_STATE_DIR = "state"


@jax.jit
def _apply(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def _checksum_input(arch: str) -> np.ndarray:
  size = 224 if arch.startswith("imagenet_") else 32
  x = np.random.default_rng(0).random((2, size, size, 3)) * 2.0 - 1.0
  return x.astype(np.float32)


def logits_checksum(model: nnx.Module, arch: str) -> dict[str, Any]:
  """Eval-mode logits on a fixed input (``default_rng(0).random((2, S, S, 3))·2 − 1``,
  S = 32 or 224): their sum and the first five logits of the first image. A cheap
  fingerprint to compare a ported model with its source (or a reload with its save)."""
  graphdef, state = nnx.split(nnx.view(model, use_running_average=True))
  logits = np.asarray(_apply(graphdef, state, jnp.asarray(_checksum_input(arch))), np.float64)
  return {
      "input": "default_rng(0).random((2, S, S, 3)) * 2 - 1, float32, NHWC, eval mode",
      "sum": float(logits.sum()),
      "first": [float(v) for v in logits[0, :5]],
  }


def save_model(path: str | os.PathLike, model: nnx.Module, *, arch: str, num_classes: int,
               metadata: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes ``model``'s parameters and BN statistics to the orbax directory ``path``.

  Args:
    path: destination directory; must not exist unless ``overwrite``.
    model: a ``sortkd_jax.models`` model of architecture ``arch``.
    arch, num_classes: what ``load_model`` rebuilds.
    metadata: extra JSON-serialisable facts (e.g. ``{"source": "x.pth"}``), stored
      under ``"metadata"`` in ``sortkd_model.json``.
    overwrite: replace an existing ``path``.

  Returns:
    The JSON metadata written (arch, num_classes, param_count, logits_checksum, ...).
  """
  path = os.path.abspath(os.fspath(path))
  if arch not in models.MODEL_NAMES:
    raise ValueError(f"Unknown arch {arch!r}. Valid names: {', '.join(models.MODEL_NAMES)}.")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path!r} already exists; pass overwrite=True (--overwrite) "
                          "to replace it.")
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tree = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
  info = {
      "format": MODEL_FORMAT,
      "version": 1,
      "arch": arch,
      "num_classes": int(num_classes),
      "param_count": models.count_params(model),
      "logits_checksum": logits_checksum(model, arch),
      "metadata": metadata or {},
  }
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stick to the final directory
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, _STATE_DIR), tree)
    ckptr.wait_until_finished()
    ckptr.close()
    with open(os.path.join(tmp, MODEL_JSON), "w") as f:
      json.dump(info, f, indent=2)
    if os.path.exists(path):  # overwrite: move the old one aside, then swap in
      trash = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.rename(path, os.path.join(trash, "old"))
      os.rename(tmp, path)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return info


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The ``sortkd_model.json`` of a ``save_model`` directory (clear error otherwise)."""
  path = os.fspath(path)
  how = ("Make one from a PyTorch file with `python scripts/port_weights.py --arch NAME "
         "--src FILE.pth --dst DIR`.")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No model checkpoint directory at {path!r}. {how}")
  meta_file = os.path.join(path, MODEL_JSON)
  if not os.path.isfile(meta_file) or not os.path.isdir(os.path.join(path, _STATE_DIR)):
    raise ValueError(f"{path!r} is not a sortkd model checkpoint (no {MODEL_JSON} and "
                     f"{_STATE_DIR}/). {how}")
  try:
    with open(meta_file) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{meta_file!r} is unreadable ({e}). {how}") from e
  if info.get("format") != MODEL_FORMAT or "arch" not in info or "num_classes" not in info:
    raise ValueError(f"{meta_file!r} is not a sortkd model description. {how}")
  return info


def load_model(path: str | os.PathLike, *, dtype=jnp.float32) -> tuple[nnx.Module, dict[str, Any]]:
  """Restores a ``save_model`` directory into a fresh model of its architecture.

  Returns:
    ``(model, metadata)``: the model in eval mode with compute ``dtype`` (weights
    float32), and the ``sortkd_model.json`` content (``arch``, ``num_classes``, ...).
  """
  path = os.path.abspath(os.fspath(path))
  info = read_model_metadata(path)
  abstract = nnx.eval_shape(lambda: models.create_model(
      info["arch"], info["num_classes"], rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  target = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
  ckptr = ocp.StandardCheckpointer()
  try:
    restored = ckptr.restore(os.path.join(path, _STATE_DIR), target)
  except Exception as e:
    raise ValueError(
        f"Could not restore the weights in {path!r} as a {info['arch']} with "
        f"{info['num_classes']} classes ({type(e).__name__}: {e}). Re-create it with "
        "scripts/port_weights.py.") from e
  finally:
    ckptr.close()
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(stats, restored["batch_stats"])
  model = nnx.merge(graphdef, params, stats)
  model.eval()
  return model, info
