"""Checkpoints.

Model-level checkpoints (``save_model`` / ``load_model``): one model's weights as an orbax
directory, e.g. a teacher ported from PyTorch by ``scripts/port_weights.py``::

    DIR/
      state/               orbax StandardCheckpointer: {'params': ..., 'batch_stats': ...}
      sortkd_model.json    {"format": "sortkd_model", "arch", "num_classes", ...}

The directory is assembled under a temporary sibling name and renamed into place, so a
crash never leaves a directory at DIR that looks valid.

Training checkpoints (``TrainCheckpointer``): the whole training state of a run, every epoch,
in ``<workdir>/checkpoints/<epoch>/`` (orbax ``CheckpointManager``; the latest N and the best
test top-1 are kept). In a multi-process run every process calls save and restore (orbax
coordinates them; process 0 writes the metadata) on one directory shared by all. Restores go to
this process's first device, so a checkpoint reads back on any number of devices or processes.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import zlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm
from absl import logging
from flax import nnx

from sortkd_jax import distributed, models

MODEL_JSON = "sortkd_model.json"
MODEL_FORMAT = "sortkd_model"
MODEL_STATE_DIR = "state"


def _local_target(tree: Any) -> Any:
  """Restore targets on this process's first device, from (abstract) arrays or orbax metadata.

  Orbax otherwise restores onto the devices recorded at save time, which fails when a
  checkpoint written on N devices (or by several processes) is read with another topology;
  every process of a multi-process run reads its own copy, then `distributed.replicate` places it.
  """
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
  """A tree's leaves by 'params/student/conv1/kernel'-style path (dataclass or dict alike)."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """The shapes of a tree's leaves (arrays or orbax metadata) by path."""
  return {path: tuple(leaf.shape) for path, leaf in _leaves_by_path(tree).items()}


def state_crc32(state: Any) -> dict[str, int]:
  """CRC-32 of each array's bytes, by path: what a restore must read back bit for bit. The
  student's logits checksum sees only the student; this also sees the optimizer state, whose
  damage would otherwise resume silently (6 ms for resnet8x4's 10 MB state on a 2-core CPU)."""
  def crc(x):
    host = np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
    return zlib.crc32(np.ascontiguousarray(host))
  return {path: crc(leaf) for path, leaf in _leaves_by_path(state).items()}


def owner(path: str) -> str:
  """The name of the user `path` belongs to."""
  uid = os.stat(path).st_uid
  try:
    return pwd.getpwuid(uid).pw_name
  except KeyError:  # a user id the system has no name for (e.g. from another machine)
    return f"user id {uid}"


def _not_readable_here(path: str) -> str | None:
  """Why this user cannot read `path` or a file or folder in it (another user's, say), or
  None: said in place of damage when a read fails (orbax words an unreadable folder as a
  missing or different structure)."""
  entries = [path] if os.path.exists(path) else []
  for root, dirs, files in os.walk(path):  # (it lists a folder it cannot enter, not its files)
    entries += [os.path.join(root, name) for name in dirs + files]
  for entry in entries:
    if not os.access(entry, os.R_OK | (os.X_OK if os.path.isdir(entry) else 0)):
      return (f"{entry} is not readable by this user (it belongs to {owner(entry)}): have that "
              "changed (chmod, chown)")
  return None


def _drop_late_tensorstore_reports() -> None:
  """Made before orbax reads or writes: after a failed one, TensorStore finishes the
  operations orbax abandoned and hands each result to orbax's event loop, closed by then; each
  reports "Event loop is closed" as unraisable, from a TensorStore thread, possibly before the
  failure is even raised. Noise, and Python 3.11 formats a report by parsing source, which can
  race the main thread's compiling (a SystemError there). Those reports are dropped; any other
  is reported."""
  if getattr(sys.unraisablehook, "drops_late_tensorstore_reports", False):
    return
  report = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    tb = unraisable.exc_traceback
    first = tb.tb_frame.f_code.co_name if tb else None
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    if not (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
            and first == "call_soon_threadsafe" and tb.tb_frame.f_code.co_name == "_check_closed"):
      report(unraisable)

  hook.drops_late_tensorstore_reports = True
  sys.unraisablehook = hook


def _failed_read(e: Exception) -> str:
  """Why an orbax restore failed, in one line: the first of the root cause (orbax wraps
  TensorStore's errors, and TensorStore appends its whole spec, on later lines or in
  brackets)."""
  while e.__cause__ is not None:
    e = e.__cause__
  first = re.split(r" See full TensorStore details| \[tensorstore_spec", str(e))[0]
  first = (first.strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first}"


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_logits(arch, num_classes, params, batch_stats, x):
  return models.model_from_pure_dicts(arch, num_classes, params, batch_stats)(x)


def _checksum_input(arch: str) -> np.ndarray:
  size = models.native_image_size(arch)
  x = np.random.default_rng(0).random((2, size, size, 3)) * 2.0 - 1.0
  return x.astype(np.float32)


def logits_checksum(arch: str, num_classes: int, params: dict,
                    batch_stats: dict) -> dict[str, Any]:
  """Eval-mode logits on a fixed input (``default_rng(0).random((2, S, S, 3))·2 − 1``,
  S = 32 or 224): their sum and the first five logits of the first image, to compare a ported
  model with its source by eye, and their projection on fixed normal weights
  (``default_rng(1).standard_normal(logits.shape)``), which unlike the sum sees classes swapped.
  A cheap fingerprint to check a reload against its save.

  Computed from the weights (pure dicts) in float32 at the highest matmul precision, whatever
  the model's compute dtype and the platform's default (TF32 on GPUs), so that it is the same
  on every machine to rounding.
  """
  # From the host: one program for the weights wherever they are (a restored state is on one
  # device, a training state on all; each placement compiled its own).
  params, batch_stats = distributed.to_host((params, batch_stats))
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(_eval_logits(arch, num_classes, params, batch_stats,
                                     _checksum_input(arch)), np.float64)
  return {
      "input": "default_rng(0).random((2, S, S, 3)) * 2 - 1, float32, NHWC, eval mode",
      "sum": float(logits.sum()),
      "first": [float(v) for v in logits[0, :5]],
      "projection": float(np.sum(logits * np.random.default_rng(1).standard_normal(
          logits.shape))),
  }


def same_logits(recorded: dict[str, Any], actual: dict[str, Any], num_classes: int) -> bool:
  """Whether two ``logits_checksum`` results agree, to 1e-3 of the logits' scale per logit
  (that times sqrt(#logits) for the sum and the projection): far above float32 rounding
  across platforms (about 1e-5 of it), below what another model's weights or damaged ones
  give (weights merely rounded, say to bfloat16, can pass). NaN agrees with NaN: a model
  saved with non-finite outputs reads back as it was (eval and the trainer report those)."""
  first = np.asarray(recorded["first"], np.float64)
  finite = np.abs(first[np.isfinite(first)])
  tolerance = 1e-3 * (1.0 + (finite.max() if finite.size else 0.0))
  return bool(np.allclose(actual["first"], first, rtol=0, atol=tolerance, equal_nan=True)
              and np.allclose([actual["sum"], actual["projection"]],
                              [recorded["sum"], recorded["projection"]], rtol=0,
                              atol=tolerance * np.sqrt(2 * num_classes), equal_nan=True))


def verifiable(checksum: dict[str, Any] | None) -> bool:
  """Whether a recorded checksum can be checked: those written before the projection was
  added could have been computed in TF32 on a GPU (the default precision then)."""
  return checksum is not None and "projection" in checksum


def describe_checksum(checksum: dict[str, Any]) -> str:
  """A checksum in one line, for error messages."""
  return (f"sum {checksum['sum']:.6f}, projection {checksum['projection']:.6f}, first "
          f"[{', '.join(f'{v:.6f}' for v in checksum['first'])}]")


def checksum_mismatch(meta: dict[str, Any], params: dict, batch_stats: dict) -> str | None:
  """How the weights' logits differ from those recorded at save time in `meta` (its
  "logits_checksum", "arch", "num_classes"), or None if they agree or cannot be checked:
  what reads back without error yet computes something else."""
  recorded = meta.get("logits_checksum")
  if not verifiable(recorded):
    return None
  actual = logits_checksum(meta["arch"], meta["num_classes"], params, batch_stats)
  if same_logits(recorded, actual, meta["num_classes"]):
    return None
  return f"{describe_checksum(actual)}; recorded {describe_checksum(recorded)}"


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
  path = write_target(path)
  models.check_name(arch, "arch")
  unwritable = unwritable_checkpoint_place(path)
  if unwritable:
    raise ValueError(f"{path!r} {unwritable}; choose another path.")
  if os.path.exists(path):
    if not overwrite:
      raise FileExistsError(f"{path!r} already exists; pass overwrite=True (--overwrite) "
                            "to replace it.")
    # Only a model directory (or an empty one) is replaced: nothing else in it may be lost.
    others = (sorted(set(os.listdir(path)) - {MODEL_JSON, MODEL_STATE_DIR})
              if os.path.isdir(path) else [os.path.basename(path)])
    if others:
      what = ("is a training workdir" if is_train_workdir(path) else
              f"holds files besides a model checkpoint ({', '.join(others[:5])})")
      raise FileExistsError(f"{path!r} {what}; overwriting replaces only a model checkpoint "
                            "directory (or an empty one). Choose another path.")
  parent = os.path.dirname(path)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise FileExistsError(f"{parent!r} is a file, not a directory: choose another path.")
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tree = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
  info = {
      "format": MODEL_FORMAT,
      "version": 1,
      "arch": arch,
      "num_classes": int(num_classes),
      "param_count": models.count_params(model),
      "logits_checksum": logits_checksum(arch, num_classes, tree["params"], tree["batch_stats"]),
      "metadata": metadata or {},
  }
  os.makedirs(parent, exist_ok=True)
  tmp = temp_beside(path, directory=True)
  set_aside = trash = None
  with full_disk_explained(path):
    try:
      os.chmod(tmp, as_umask_allows(0o777))
      with _finishing_before_interrupt():  # else orbax's thread wrote on into a deleted `tmp`
        _drop_late_tensorstore_reports()
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, MODEL_STATE_DIR), tree)
        ckptr.wait_until_finished()
        ckptr.close()
      with open(os.path.join(tmp, MODEL_JSON), "w") as f:
        json.dump(info, f, indent=2)
      if os.path.exists(path):  # overwrite: move the old one aside, then swap in
        trash = temp_beside(path, directory=True, tag="old")
        set_aside = os.path.join(trash, "old")
        try:
          os.rename(path, set_aside)
        except PermissionError as e:  # a folder moves only with write access to it
          raise PermissionError(e.errno, f"{e.strerror}: {path} cannot be replaced by this "
                                "user; choose another destination.") from None
        os.rename(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
      else:
        os.rename(tmp, path)
    except BaseException:  # Ctrl-C too: the old model stays at `path`
      if set_aside and not os.path.exists(path) and os.path.exists(set_aside):
        os.rename(set_aside, path)
      if trash:  # empty by now, or holding the replaced model
        shutil.rmtree(trash, ignore_errors=True)
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return info


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The ``sortkd_model.json`` of a ``save_model`` directory (clear error otherwise)."""
  path = os.fspath(path)
  how = ("Make one from a PyTorch file with `python scripts/port_weights.py --src FILE.pth "
         "--dst DIR`.")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No model checkpoint directory at {path!r}. {how}")
  meta_file = os.path.join(path, MODEL_JSON)
  if not os.path.isfile(meta_file) or not os.path.isdir(os.path.join(path, MODEL_STATE_DIR)):
    model_dir = _model_directory_above(path)
    if model_dir is not None:
      raise ValueError(f"{path!r} is inside the model checkpoint {model_dir!r}: pass that "
                       "directory.")
    raise ValueError(f"{path!r} is not a sortkd model checkpoint (no {MODEL_JSON} and "
                     f"{MODEL_STATE_DIR}/). {how}")
  try:
    with open(meta_file) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    why = _not_readable_here(meta_file)
    raise ValueError(f"{meta_file!r} is unreadable ({e}). " + (f"{why}." if why else how)
                     ) from e
  if (not isinstance(info, dict) or info.get("format") != MODEL_FORMAT or "arch" not in info
      or "num_classes" not in info):
    raise ValueError(f"{meta_file!r} is not a sortkd model description. {how}")
  return info


def _model_directory_above(path: str) -> str | None:
  """The `save_model` directory that `path` lies inside, if any (say, its state/)."""
  below = os.path.abspath(path)
  while os.path.dirname(below) != below:
    below = os.path.dirname(below)
    if os.path.isfile(os.path.join(below, MODEL_JSON)):
      return below
  return None


def load_model(path: str | os.PathLike, *,
               dtype: jnp.dtype = jnp.float32) -> tuple[nnx.Module, dict[str, Any]]:
  """Restores a ``save_model`` directory into a fresh model of its architecture, checked
  against the logits recorded at save time (``logits_checksum``).

  Returns:
    ``(model, metadata)``: the model in eval mode with compute ``dtype`` (weights
    float32), and the ``sortkd_model.json`` content (``arch``, ``num_classes``, ...).
  """
  path = os.path.abspath(os.fspath(path))
  info = read_model_metadata(path)
  _, params, stats = nnx.split(models.abstract_model(info["arch"], info["num_classes"]),
                               nnx.Param, nnx.BatchStat)
  target = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
  _drop_late_tensorstore_reports()
  ckptr = ocp.StandardCheckpointer()
  try:
    restored = ckptr.restore(os.path.join(path, MODEL_STATE_DIR), _local_target(target))
  except Exception as e:
    raise ValueError(
        f"Could not restore the weights in {path!r} as a {info['arch']} with "
        f"{info['num_classes']} classes ({_failed_read(e)}). "
        f"{_not_readable_here(path) or 'Re-create it with scripts/port_weights.py'}.") from e
  finally:
    ckptr.close()
  mismatch = checksum_mismatch(info, restored["params"], restored["batch_stats"])
  if mismatch:  # damaged or mixed-up files, or an architecture whose code changed since
    raise ValueError(
        f"The weights in {path!r} do not give the logits recorded when they were saved "
        f"({mismatch}): the checkpoint is damaged, or was written by a version of sortkd-jax "
        f"whose {info['arch']} computes differently. Re-create it with "
        "scripts/port_weights.py.")
  return models.model_from_pure_dicts(info["arch"], info["num_classes"], restored["params"],
                                      restored["batch_stats"], dtype=dtype), info


def write_target(path: str | os.PathLike) -> str:
  """The absolute path that writing `path` replaces, its symbolic links followed as `open`
  follows them (a `..` after a linked folder too). Renaming a finished file onto a link would
  replace the link, not what it names, and fail for a directory through a dangling link. A
  leading `~` is the home folder (quoted, `--dst '~/m'` made a folder named `~`)."""
  return os.path.realpath(os.path.expanduser(os.fspath(path)))


def unwritable_checkpoint_place(path: str) -> str | None:
  """Why a checkpoint written at `path` could not be read back, else None. orbax finds its own
  files with a glob of the path, so below a folder such as `exp[3]` the run saved, finished and
  reported success, and every epoch was unreadable. TensorStore takes only UTF-8 paths: another
  name failed at the first save, an epoch in."""
  place = os.path.abspath(path)  # as orbax has it: a link to such a folder is fine
  try:
    place.encode("utf-8")
  except UnicodeEncodeError:
    return "is not UTF-8 text, which checkpoints need (TensorStore)"
  if not fnmatch.fnmatchcase(place, place):
    return ("holds brackets, [...], which orbax reads as a pattern: the checkpoints written "
            "there could not be read back")
  return None


def temp_beside(path: str, *, directory: bool, tag: str = "tmp") -> str:
  """A new, uniquely named temporary directory or (empty) file beside `path`, on its filesystem,
  to be renamed to `path` whole: a fixed name such as `path + ".tmp"` may be someone's file.
  Its name stays short for any legal `path`, and a failure (say, a read-only folder) names
  `path`, not the temporary name."""
  parent = os.path.dirname(os.path.abspath(path))
  prefix = f".{os.path.basename(path)[:64]}.{tag}-"
  try:
    if directory:
      return tempfile.mkdtemp(prefix=prefix, dir=parent)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.close(fd)
    return tmp
  except OSError as e:
    raise OSError(e.errno, f"cannot write {path} in {parent}: {e.strerror}") from None


def as_umask_allows(mode: int) -> int:
  """`mode` as the process's umask leaves it for a new file or folder: `temp_beside`'s 0600 or
  0700 would stick to what is renamed into place, and a group could not read or replace it."""
  umask = os.umask(0)
  os.umask(umask)
  return mode & ~umask


# ----------------------------------------------------------------------------- training runs


def is_train_workdir(path: str) -> bool:
  """Whether `path` is the workdir of a training run of this project."""
  return os.path.isdir(os.path.join(path, TRAIN_CHECKPOINT_DIR))


def saved_epochs(workdir: str) -> list[int]:
  """The epochs a run's workdir holds checkpoints of, read from the directory names alone
  (orbax names a finished save `<epoch>/`, one in progress otherwise)."""
  return _epoch_folders(os.path.join(workdir, TRAIN_CHECKPOINT_DIR))


def _epoch_folders(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def latest_saved_epoch(workdir: str) -> int | None:
  """The last epoch a run's workdir holds a checkpoint of; None if none."""
  return max(saved_epochs(workdir), default=None)


def check_epoch_kept(workdir: str, epoch: int) -> None:
  """Raises, naming the kept ones, unless the run keeps `epoch` (it deletes old epochs)."""
  kept = saved_epochs(workdir)
  if epoch not in kept:
    raise FileNotFoundError(
        f"The run in {workdir} keeps no checkpoint of epoch {epoch}; it keeps " +
        (f"epochs {', '.join(map(str, kept))}." if kept else "none."))


TRAIN_CHECKPOINT_DIR = "checkpoints"


class TrainCheckpointer:
  """Per-epoch training checkpoints in `<workdir>/checkpoints`: the latest N plus the best.

  Each epoch saves the whole TrainState (student, optimizer state, CTKD θ, step) and a small
  JSON (test top-1, best top-1, step, architecture, class count, the student's and the
  teacher's logits checksums, the CRC-32 of every array of the state). Saves are asynchronous
  and atomic: orbax writes into a temporary directory and renames it when complete, so a crash
  during a save leaves the previous checkpoint as the latest valid one.

  `delete_unfinished_saves`: removes the temporary directories that saves cut short by a kill
  left, which orbax otherwise keeps for good. Only for the run holding the workdir's lock: a
  reader of a live run would delete the save in progress. (orbax's own option does it in a
  thread that nothing waits for before the first save: a run stopped sooner kept them, and its
  exit printed the thread's traceback.)
  """

  def __init__(self, directory: str, keep: int = 2, *, delete_unfinished_saves: bool = False):
    self.directory = os.path.abspath(directory)
    if delete_unfinished_saves and jax.process_index() == 0:  # the process that renames saves
      for unfinished in ocp.path.step.all_temporary_paths(self.directory):
        shutil.rmtree(unfinished.get(), ignore_errors=True)
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(keep), cm.BestN(get_metric_fn=lambda m: m["test_top1"], n=1)])
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, handler, save, restore in (
        ("state", ocp.StandardCheckpointHandler(), ocp.args.StandardSave, ocp.args.StandardRestore),
        ("meta", ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore)):
      handlers.add(item, save, handler)
      handlers.add(item, restore, handler)
    # best_fn makes orbax write each step's metrics, so the policy still sees the epochs
    # saved before a restart (without them it keeps those forever).
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda m: m["test_top1"], best_mode="max"),
        handler_registry=handlers)
    self._unconfirmed = None  # the epoch of a background save not yet known to have succeeded
    self._save_failed = False
    _drop_late_tensorstore_reports()

  def latest_epoch(self) -> int | None:
    return self._manager.latest_step()

  def save(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving `epoch` in the background, once the previous save (and its deletion of
    the epochs no longer kept) is complete."""
    meta = {**meta, "state_crc32": state_crc32(state)}
    with _finishing_before_interrupt():
      self._wait_for_save()
      with self._failed_save_explained(epoch):
        _check_folders_can_be_made_in(self.directory)
        self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics={"test_top1": meta["test_top1"]})
    self._unconfirmed = epoch

  def check_background_save(self) -> None:
    """Raises at once if the background save has ended in failure (a full disk, say), so that
    the run stops before training a further epoch that could not be saved either."""
    if self._unconfirmed is not None and not self._manager.is_saving_in_progress():
      self._wait_for_save()

  def _wait_for_save(self) -> None:
    epoch, self._unconfirmed = self._unconfirmed, None
    with self._failed_save_explained(epoch):
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _failed_save_explained(self, epoch: int | None) -> Iterator[None]:
    """Re-raises a failed save as an OSError that names the epoch, the cause (said plainly for
    a full disk), the epochs kept and where the same command resumes."""
    try:
      yield
    except Exception as e:
      self._save_failed = True
      kept = _epoch_folders(self.directory)
      resume = (f"it resumes after epoch {kept[-1]}, the last one saved" if kept
                else "with no epoch saved, it starts again from epoch 1")
      what = (f"its filesystem is full ({os.strerror(errno.ENOSPC)}). Free space there, then"
              if disk_full(e) else f"{type(e).__name__}: {e}. Once that is fixed,")
      raise OSError(f"Saving epoch {epoch} in {self.directory} failed: {what} re-run the same "
                    f"command: {resume}.") from e

  def restore(self, epoch: int, target: Any = None) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure (and dtypes) of `target`, e.g. a freshly created state;
    without one, as the saved nested dicts (e.g. to read a run's student). Refuses a state
    that does not read back bit for bit as saved (checkpoints of older versions unchecked)."""
    try:
      metadata = self._manager.metadata(epoch).item_metadata["state"]
    except Exception as e:
      raise self._unreadable(epoch, e) from e
    if metadata is None:  # orbax's word for a state without its metadata file
      raise self._unusable(epoch, "cannot be read (its state/_METADATA is missing: say, a copy "
                           "cut short)")
    saved = metadata.tree
    if target is not None:
      self._check_layout(epoch, saved, target)
    try:
      restored = self._manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_local_target(saved if target is None else target)),
          meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise self._unreadable(epoch, e) from e
    recorded = restored.meta.get("state_crc32")
    if recorded is not None:
      actual = state_crc32(restored.state)
      changed = sorted(path for path in actual if actual[path] != recorded.get(path))
      if changed:
        raise self._unusable(epoch, f"does not read back as it was saved ({len(changed)} of "
                             f"{len(actual)} arrays differ, e.g. {changed[0]}): it is damaged")
    return restored.state, restored.meta

  def read_meta(self, epoch: int) -> dict[str, Any]:
    """The small JSON saved with `epoch` alone, e.g. its class count before its state is read."""
    try:
      return self._manager.restore(epoch, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      raise self._unreadable(epoch, e) from e

  def check_student(self, epoch: int, meta: dict[str, Any], params: dict,
                    batch_stats: dict) -> None:
    """Refuses an epoch whose student does not give the logits recorded when it was saved:
    damage that orbax reads back without error."""
    if "state_crc32" not in meta and not verifiable(meta.get("logits_checksum")):
      logging.warning("The checkpoint of epoch %d in %s, written by an older sortkd-jax, records "
                      "no checksum: damage that reads back without error cannot be detected.",
                      epoch, self.directory)
    mismatch = checksum_mismatch(meta, params, batch_stats)
    if mismatch:
      raise self._unusable(epoch, "does not give the student's logits recorded when it was "
                           f"saved ({mismatch}): it is damaged")

  def _unreadable(self, epoch: int, e: Exception) -> ValueError:
    return self._unusable(epoch, f"cannot be read ({_failed_read(e)})")

  def _unusable(self, epoch: int, reason: str) -> ValueError:
    broken = os.path.join(self.directory, str(epoch))
    not_readable = _not_readable_here(broken)
    if not_readable:  # not damaged: setting it aside would hide a good epoch
      return ValueError(f"The checkpoint of epoch {epoch}, {broken}, cannot be read: "
                        f"{not_readable}.")
    others = [s for s in self._manager.all_steps() if s != epoch]
    fallback = ("No other epoch is kept." if not others else
                f"To use the other kept epochs ({', '.join(map(str, others))}), move it out "
                f"of the way: mv {shlex.quote(broken)} {shlex.quote(broken + '.set-aside')}")
    return ValueError(f"The checkpoint of epoch {epoch}, {broken}, {reason}. {fallback}")

  def _check_layout(self, epoch: int, saved: Any, target: Any) -> None:
    """Refuses a checkpoint whose state has other fields than `target` (another version's
    TrainState) or other shapes (other data): every kept epoch has the same layout, so setting
    one aside cannot help."""
    saved_shapes, target_shapes = _leaf_shapes(saved), _leaf_shapes(target)
    saved_paths, target_paths = set(saved_shapes), set(target_shapes)
    if saved_paths != target_paths:
      differences = [f"only in the checkpoint: {', '.join(sorted(saved_paths - target_paths))}",
                     f"only in this version: {', '.join(sorted(target_paths - saved_paths))}"]
      raise ValueError(
          f"The checkpoint of epoch {epoch} in {self.directory} holds another training-state "
          f"layout than this version of sortkd-jax resumes "
          f"({'; '.join(d for d in differences if not d.endswith(': '))}), so the run cannot "
          "be continued; it was written by another version. Its student can still be "
          "evaluated with scripts/eval.py --checkpoint "
          f"{shlex.quote(os.path.dirname(self.directory))}; train in a new --workdir.")
    reshaped = [f"{path}: {saved_shapes[path]} in the checkpoint, {target_shapes[path]} now"
                for path in sorted(saved_paths) if saved_shapes[path] != target_shapes[path]]
    if reshaped:
      raise ValueError(
          f"The checkpoint of epoch {epoch} in {self.directory} holds arrays of other shapes "
          f"than this run's state ({'; '.join(reshaped[:3])}): the run was trained on data "
          "with another number of classes. Resume it with its own data, or train in a new "
          "--workdir.")

  def best_epoch(self) -> int:
    """The kept epoch with the highest test top-1."""
    best = self._manager.best_step()  # from the metrics saved with each epoch; ties: latest
    if best is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    return best

  def close(self) -> None:
    with _finishing_before_interrupt():
      try:
        self._wait_for_save()
      finally:
        if self._save_failed:  # raised once, explained: orbax's close raises it again, bare
          with contextlib.suppress(Exception):
            self._manager.close()
        else:
          self._manager.close()


# Set when a held-back Ctrl-C has been delivered, until a save completes uninterrupted: the
# trainer closes its checkpoints after a Ctrl-C, and a second Ctrl-C there must stop at once.
_interrupt_delivered = False


@contextlib.contextmanager
def _finishing_before_interrupt() -> Iterator[None]:
  """Holds back a Ctrl-C until the block ends, then delivers it to the SIGINT handler that was
  in place (KeyboardInterrupt by default); a second one, or one after a delivered one, at once.

  A KeyboardInterrupt inside orbax's wait for its save thread (CPython 3.11's `Thread.join`)
  marks that thread finished while it is still writing or deleting, and the process then
  exits under it: orbax logged a traceback, and an epoch no longer kept was left half deleted.
  """
  global _interrupt_delivered
  previous = signal.getsignal(signal.SIGINT)
  if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
    yield  # signals reach only the main thread; an ignored Ctrl-C stays ignored
    return
  held_back = None

  def deliver(signum: int, frame: Any) -> None:
    global _interrupt_delivered
    _interrupt_delivered = True
    if callable(previous):
      previous(signum, frame)
    else:  # SIG_DFL, or a handler not installed from Python
      raise KeyboardInterrupt

  def hold_back(signum: int, frame: Any) -> None:
    nonlocal held_back
    if held_back is not None or _interrupt_delivered:
      deliver(signum, frame)
      return
    held_back = signum
    logging.warning("Interrupted: finishing the checkpoint save in progress first (Ctrl-C "
                    "again to stop at once, which may leave it incomplete).")

  signal.signal(signal.SIGINT, hold_back)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
  if held_back is None:
    _interrupt_delivered = False
  else:
    deliver(held_back, None)


def _check_folders_can_be_made_in(directory: str) -> None:
  """Raises what making a folder in `directory` meets: made unwritable since the run started,
  remounted read-only, a full disk or quota. orbax's own failure to make an epoch's folder
  left its threads waiting 5 minutes for it before the process could exit."""
  if not os.path.isdir(directory):
    return
  if not os.access(directory, os.W_OK | os.X_OK):
    raise PermissionError(errno.EACCES, "this user cannot write in it (it belongs to "
                          f"{owner(directory)})", directory)
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".folder-check-", dir=directory))
  except OSError as e:
    raise OSError(e.errno, e.strerror, directory) from e


@contextlib.contextmanager
def full_disk_explained(path: str) -> Iterator[None]:
  """Re-raises a write of `path` that failed for a full disk as an OSError that says so and
  names `path` (orbax's error names a temporary path, and torch's names no cause)."""
  try:
    yield
  except Exception as e:
    if not disk_full(e):
      raise
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: cannot write {path}, its "
                  "filesystem is full; nothing was written there (what was there is kept). "
                  "Free space there, then re-run the same command.") from e


def disk_full(e: BaseException | None) -> bool:
  """Whether `e`, or an error that led to it, is a full filesystem: an OSError with ENOSPC,
  or TensorStore's error text for it (orbax's writes)."""
  while e is not None:
    if (getattr(e, "errno", None) == errno.ENOSPC
        or f"[os_error_code='{errno.ENOSPC}']" in str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def workdir_of(path: str) -> str:
  """The workdir of the run that `path` is one kept epoch of, else `path` itself."""
  in_run = run_epoch_folder(path)
  return in_run[0] if in_run else path


def run_epoch_folder(path: str) -> tuple[str, int] | None:
  """(workdir, epoch) for one kept epoch of a training run, `<workdir>/checkpoints/<epoch>` (as
  mdistiller's `epoch_N`), or a link to one (say, `best -> run/checkpoints/7`); None for any
  other path."""
  for spelling in (os.path.normpath(path), os.path.realpath(path)):
    folder, name = os.path.split(spelling)
    if (os.path.basename(folder) == TRAIN_CHECKPOINT_DIR and name.isdigit()
        and not os.path.isfile(os.path.join(spelling, MODEL_JSON))):  # a model named by a number
      return os.path.dirname(folder) or os.curdir, int(name)
  return None


def check_run_epoch_kept(path: str) -> None:
  """For `<workdir>/checkpoints/<epoch>` of a run: raises, naming the epochs it keeps, if the
  run has deleted that one (it keeps its latest and its best)."""
  in_run = run_epoch_folder(path)
  if in_run and is_train_workdir(in_run[0]):
    check_epoch_kept(*in_run)


def load_student_from_workdir(workdir: str, *, epoch: int | None = None,
                              dtype: jnp.dtype = jnp.float32) -> tuple[nnx.Module, dict[str, Any]]:
  """The student of a training run at `epoch`, by default its best (the latest among ties), in
  eval mode, and its metadata with that `epoch` and whether it is the `best`.

  A run still training deletes its best epoch once it has saved a better one, which may be while
  that one is read (by eval.py, export_weights.py or a run using it as its teacher): the read
  then fails, and the new best is read instead."""
  for attempt in range(_BEST_EPOCH_READS):
    ckpt = TrainCheckpointer(os.path.join(workdir, TRAIN_CHECKPOINT_DIR))
    try:
      if epoch is not None:
        check_epoch_kept(workdir, epoch)
      chosen = ckpt.best_epoch() if epoch is None else epoch
      try:
        state, meta = ckpt.restore(chosen)
        ckpt.check_student(chosen, meta, state["params"]["student"], state["batch_stats"])
      except ValueError as e:
        if epoch is not None:
          check_epoch_kept(workdir, epoch)  # deleted meanwhile: said as such
        elif _best_epoch_now(workdir) not in (chosen, None):
          if attempt + 1 < _BEST_EPOCH_READS:
            logging.info("Epoch %d of %s was deleted while it was read, as the run saved a "
                         "better one: reading that.", chosen, workdir)
            continue
          raise ValueError(
              f"The run in {workdir} saved a better epoch, deleting its best while it was read, "
              f"{_BEST_EPOCH_READS} times in a row (epoch {chosen} last): its epochs are shorter "
              "than a read. Read it once it has ended.") from e
        raise
      best = ckpt.best_epoch()
    finally:
      ckpt.close()
    student = models.model_from_pure_dicts(meta["arch"], meta["num_classes"],
                                           state["params"]["student"], state["batch_stats"],
                                           dtype=dtype)
    return student, {**meta, "epoch": chosen, "best": chosen == best}


# A run saves a better epoch at most once per epoch it trains, so two reads in a row that lose
# their epoch to it would need epochs shorter than a read.
_BEST_EPOCH_READS = 3


def _best_epoch_now(workdir: str) -> int | None:
  """The best epoch a run keeps now (a checkpointer lists the epochs only when it opens)."""
  ckpt = TrainCheckpointer(os.path.join(workdir, TRAIN_CHECKPOINT_DIR))
  try:
    return ckpt.best_epoch()
  except FileNotFoundError:
    return None
  finally:
    ckpt.close()
