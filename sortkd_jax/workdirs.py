"""A run's workdir: one run at a time, and a resume only with the config it was trained with.

    <workdir>/
      train.lock       held (flock) by process 0 while a run trains here
      config.json      the run's config, written once a start is accepted
      checkpoints/     per-epoch training checkpoints (`checkpoint.TrainCheckpointer`)
      metrics.jsonl    and TensorBoard events (`reporting.Reporter`)
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import shlex
import socket
from typing import IO, Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sortkd_jax import checkpoint, methods, reporting

LOCK_FILE = "train.lock"
CONFIG_FILE = "config.json"


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """One run per workdir: a second one (say, launched twice) would overwrite the first's
  checkpoints and logs. Process 0 holds an flock on `<workdir>/train.lock`, which the system
  releases if the process dies, and tells the others whether it got it. A start that leaves
  nothing but the lock file it made takes that file away again, and the workdir if it made it."""
  _check_workdir_kind(workdir)  # before anything is written into it
  lock_file, created, lock_created, refusal = None, False, False, None
  if jax.process_index() == 0:
    created = not os.path.exists(workdir)
    lock_created = not os.path.exists(os.path.join(workdir, LOCK_FILE))
    try:
      _check_run_folders_writable(workdir)
      lock_file = _flock(workdir)
    except ValueError as e:
      refusal = e
      if created and os.path.isdir(workdir) and not os.listdir(workdir):
        os.rmdir(workdir)
  if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(
      np.int32(refusal is not None)):
    refusal = refusal or ValueError(f"Process 0 could not start the run in {workdir}; see its "
                                    "error.")
  if refusal is not None:
    raise refusal
  try:
    yield
  finally:
    if lock_file is not None:
      _locked_here.discard((os.getpid(), os.path.realpath(workdir)))
      if lock_created and os.listdir(workdir) == [LOCK_FILE]:  # a failed start: leave nothing
        os.remove(lock_file.name)
        if created:
          os.rmdir(workdir)
      lock_file.close()


# (process id, real path) of the workdirs locked by this process: a notebook's or a sweep's
# calls from several threads (a forked worker has another process id).
_locked_here: set[tuple[int, str]] = set()


def _check_run_folders_writable(workdir: str) -> None:
  """Refuses a run whose checkpoint or TensorBoard folders this user cannot write in (another
  user's, say): the run would fail at its first save, an epoch later, or when it removes an old
  epoch, after the next one was saved."""
  for name in (checkpoint.TRAIN_CHECKPOINT_DIR, reporting.TENSORBOARD_DIR):
    for folder, _, _ in os.walk(os.path.join(workdir, name)):
      if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder} of the run in {workdir} cannot be written by this user (it "
                         f"belongs to {checkpoint.owner(folder)}), and the run saves and removes "
                         "files there: have that changed (chown, chmod), or use another "
                         "--workdir.")


def _flock(workdir: str) -> IO[str]:
  """`<workdir>/train.lock`, created if need be and flock-ed, saying who holds it."""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    try:
      lock = open(path, "a+")
    except PermissionError:
      if not (os.path.isfile(path) and os.access(workdir, os.W_OK | os.X_OK)):
        raise
      lock = open(path)  # another user's, from an earlier start: flock needs no write access
  except OSError as e:  # e.g. a read-only mount of a finished run: it can still be evaluated
    epochs = []
    with contextlib.suppress(OSError):
      epochs = checkpoint.saved_epochs(workdir)
    held = (f" It holds a run saved up to epoch {max(epochs)}: scripts/eval.py --checkpoint "
            f"{shlex.quote(workdir)} evaluates it without writing there." if epochs else "")
    raise ValueError(f"--workdir {workdir} cannot be created or written ({e.strerror}).{held}"
                     ) from e
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.seek(0)
    holder = lock.read().strip()
    lock.close()
    if (os.getpid(), os.path.realpath(workdir)) in _locked_here:
      holder += ", this very process: a call still running in another thread"
    raise ValueError(f"Another run is training in {workdir} ({holder}); wait for it to end, or "
                     "use another --workdir.") from None
  except OSError as e:  # e.g. a cluster filesystem mounted without flock support
    logging.warning("Cannot lock %s (%s): a second run in this workdir would go unnoticed.",
                    lock.name, e.strerror)
  try:
    if lock.writable():
      lock.truncate(0)
      lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
      lock.flush()
  except OSError as e:  # e.g. a full disk; the lock is this run's, so its file may go
    with contextlib.suppress(OSError):  # closing flushes what could not be written: fails too
      lock.close()
    os.remove(lock.name)
    raise ValueError(f"--workdir {workdir} cannot be written ({e.strerror}).") from e
  _locked_here.add((os.getpid(), os.path.realpath(workdir)))
  return lock


# Fields a resumed run may change: they do not alter what the checkpoints were trained on
# (steps per dispatch, teacher stream groups and teacher folding only by float rounding), nor
# the test set that the best top-1 so far was measured on (the data paths say where the same
# data is, e.g. after a move; other data with another number of steps per epoch is refused on
# resume). `pair` only names the recipe's pair: what it sets is compared field by field.
RESUMABLE_CHANGES = ("pair", "num_epochs", "log_every_steps", "steps_per_dispatch",
                     "teacher_stream_groups", "eval_batch_size", "checkpoints_to_keep",
                     "teacher.checkpoint", "teacher.fold_batchnorm", "data.data_dir",
                     "data.folder", "data.cache_dir", "data.download", "data.manual_dir")


# Paths that each host may reach its own copy of the same data by.
_PER_HOST_FIELDS = ("data.data_dir", "data.folder", "data.cache_dir", "data.manual_dir")


def launch_identity(config: ml_collections.ConfigDict, workdir: str) -> str:
  """What every process of a run must be given alike (`distributed.check_same_launch`): its
  config as config.json records it (paths absolute) but for the per-host paths, and its
  workdir, absolute too."""
  fields = {k: v for k, v in _flat(_as_recorded(config)).items() if k not in _PER_HOST_FIELDS}
  return json.dumps([fields, os.path.abspath(workdir)], sort_keys=True)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _lacking_run_fields(recorded: Any) -> list[str]:
  """The fields that every version writes into a run's config.json and `recorded` (a parsed
  one) lacks."""
  flat = _flat(recorded) if isinstance(recorded, dict) else {}
  return [k for k in ("method", "student.name", "data.name", "seed") if k not in flat]


def with_missing_fields(recorded: dict[str, Any], recipe: ml_collections.ConfigDict
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`recorded` (a run's config.json) completed with the fields it lacks, as `recipe` gives
  them, and those fields: a config.json from before they were added to the recipes (or edited
  by hand) still describes its run, and reading it must not fail on a missing field."""
  have = _flat(recorded)
  added = {k: v for k, v in _flat(json.loads(recipe.to_json_best_effort())).items()
           if k not in have}
  completed = copy.deepcopy(recorded)
  for key, value in added.items():
    *groups, name = key.split(".")
    node = completed
    for group in groups:
      if not isinstance(node.get(group), dict):  # absent, or null
        node[group] = {}
      node = node[group]
    node[name] = value
  return completed, added


def check_place(workdir: str, data: ml_collections.ConfigDict) -> None:
  """Refuses a blank workdir and a filesystem root; one inside another run's checkpoints/ or
  tensorboard/; a path where checkpoints cannot be written
  (`checkpoint.unwritable_checkpoint_place`); one at or inside the data folder the run reads (its
  checkpoints/ and tensorboard/ would become class folders of an image folder); one holding a
  config.json that is not a run's, which the run would write over (say, a model folder); and one
  holding a metrics.jsonl without a config.json, which a fresh start would
  empty (no run of ours writes the first without the second)."""
  if not workdir.strip():
    raise ValueError(f"--workdir {workdir!r} is blank; name a directory.")
  real = os.path.realpath(workdir)
  if os.path.dirname(real) == real:
    raise ValueError(f"--workdir {workdir} is the filesystem root; name a directory for the run.")
  _check_outside_other_runs(workdir, real)
  unwritable = checkpoint.unwritable_checkpoint_place(workdir)
  if unwritable:
    raise ValueError(f"--workdir {workdir!r} {unwritable}; choose another --workdir.")
  path = os.path.join(workdir, CONFIG_FILE)
  unsaved = checkpoint.latest_saved_epoch(workdir) is None
  if (unsaved and os.path.isfile(os.path.join(workdir, reporting.METRICS_FILE))
      and not os.path.exists(path)):
    raise ValueError(f"--workdir {workdir} holds a {reporting.METRICS_FILE} but no {CONFIG_FILE}: "
                     "not a run of ours, and a fresh start would empty that file; choose another "
                     "--workdir.")
  # (Beside saved epochs, check_resumable says what is wrong with a run's config.json.)
  if unsaved and os.path.isfile(path):
    try:
      recorded = read_run_config(workdir)
    except ValueError:  # not JSON, or not text
      recorded = None
    if _lacking_run_fields(recorded):
      raise ValueError(f"--workdir {workdir} holds a {CONFIG_FILE} that is not a training run's, "
                       "and the run would write its own over it: choose another --workdir.")
  if data.get("folder"):
    folder = os.path.realpath(os.path.expanduser(data.folder))
    if os.path.commonpath([folder, real]) == folder:
      raise ValueError(f"--workdir {workdir} is inside the data folder {data.folder} that the "
                       "run reads (its files would be read as part of the data); choose a "
                       "directory outside it.")


def _check_outside_other_runs(workdir: str, real: str) -> None:
  """Refuses a workdir inside another run's checkpoints/ (whose epochs that run deletes as it
  trains on) or tensorboard/ (where TensorBoard would show both runs' events as one)."""
  below = real
  while os.path.dirname(below) != below:
    run = os.path.dirname(below)
    if (os.path.basename(below) in (checkpoint.TRAIN_CHECKPOINT_DIR, reporting.TENSORBOARD_DIR)
        and any(os.path.isfile(os.path.join(run, f)) for f in (CONFIG_FILE, LOCK_FILE))):
      raise ValueError(f"--workdir {workdir} is inside the {os.path.basename(below)}/ folder of "
                       f"the training run {run}, which that run manages (it deletes old "
                       "epochs as it trains on); choose a directory outside it.")
    below = run


def _check_workdir_kind(workdir: str) -> None:
  """Refuses a file and a model directory as a workdir."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file; choose a directory.")
  if os.path.isfile(os.path.join(workdir, checkpoint.MODEL_JSON)):
    raise ValueError(f"{workdir} holds a model checkpoint (e.g. a ported teacher), not a "
                     "training run; choose another --workdir.")


def read_run_config(workdir: str) -> dict[str, Any]:
  """The config.json of the run in `workdir`, with what to do if it is damaged."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
    if not isinstance(recorded, dict):
      raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
  except ValueError as err:  # not JSON, not UTF-8 text, or not a config
    raise _damaged(path, str(err)) from None
  return recorded


def _damaged(path: str, why: str) -> ValueError:
  return ValueError(f"{path}, the run's recorded config, is damaged ({why}): restore it from a "
                    "copy (eval.py also takes the run's recipe as --config instead).")


def run_config_of(path: str) -> dict[str, Any] | None:
  """The config.json of the run that `path` is (its workdir or one kept epoch), or None for
  any other model (ported, a run without one); ValueError if it is damaged."""
  workdir = checkpoint.workdir_of(path)
  if not (checkpoint.is_train_workdir(workdir)
          and os.path.isfile(os.path.join(workdir, CONFIG_FILE))):
    return None
  recorded = read_run_config(workdir)
  lacking = _lacking_run_fields(recorded)
  if lacking:  # e.g. "data": null
    raise _damaged(os.path.join(workdir, CONFIG_FILE), f"it lacks {', '.join(lacking)}")
  return recorded


def check_resumable(config: ml_collections.ConfigDict, workdir: str
                    ) -> dict[str, tuple[Any, Any]]:
  """Refuses checkpoints that were trained with another recipe. Returns the fields a resume
  changes, as config.json records them, `{field: (was, now)}`: config.json is then rewritten,
  and the run's `"kind": "start"` record keeps them."""
  saved_path = os.path.join(workdir, CONFIG_FILE)
  if checkpoint.latest_saved_epoch(workdir) is None:
    return {}  # nothing trained yet (or a run stopped in its first epoch): any config may start
  if not os.path.exists(saved_path):  # a run writes it before its first epoch
    raise FileNotFoundError(
        f"{workdir} holds checkpoints (epochs {checkpoint.saved_epochs(workdir)}) but no "
        f"{CONFIG_FILE}, so resuming cannot check that they were trained with this config: "
        f"copy the run's {CONFIG_FILE} back beside checkpoints/, or use a new --workdir.")
  recorded = read_run_config(workdir)
  lacking = _lacking_run_fields(recorded)
  if lacking:  # not a run's config as it saved it
    raise ValueError(
        f"{os.path.join(workdir, CONFIG_FILE)}, the run's recorded config, lacks "
        f"{', '.join(lacking)}, so resuming cannot check that the checkpoints were trained with "
        "this config: restore it from a copy, or use a new --workdir.")
  saved = _flat(recorded)
  current = _flat(_as_recorded(config))  # paths as config.json records them
  # Fields added to the recipes since the run started (a newer sortkd-jax): nothing to compare.
  added = sorted(current.keys() - saved.keys())
  if added:
    logging.info("Fields new since this run started, taken as the config gives them: %s.",
                 ", ".join(f"{k}={current[k]!r}" for k in added))
  differ = {k: f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in sorted(saved)
            if saved[k] != current.get(k)}
  unread = [text for k, text in differ.items() if _unread_by_method(config, k)]
  changed = [text for k, text in differ.items()
             if k not in RESUMABLE_CHANGES and not _unread_by_method(config, k)]
  if changed:
    raise ValueError(
        f"{workdir} holds a run with another config ({'; '.join(changed)}). Use a new "
        f"--workdir, or the run's own settings to resume it (only "
        f"{', '.join(RESUMABLE_CHANGES)} may change, and what config.method does not read).")
  resumable = [text for k, text in differ.items() if k in RESUMABLE_CHANGES]
  if resumable:  # so that a log shows, say, when a run was extended
    logging.info("Changed since the run started, as a resume allows: %s.", "; ".join(resumable))
  if unread:
    logging.info("Changed fields that config.method %r does not read, taken as the config "
                 "gives them: %s.", config.method, "; ".join(unread))
  return {k: (saved.get(k), current.get(k)) for k in sorted({*differ, *added})}


def _unread_by_method(config: ml_collections.ConfigDict, key: str) -> bool:
  """Whether the flat `key` lies in a group or field that `config.method` never reads (the
  method itself is compared, so it is the run's whenever this matters)."""
  return any(key == u or key.startswith(f"{u}.") for u in methods.unread_fields(config))


def check_same_teacher(teacher_path: str, saved_meta: dict[str, Any],
                       checksum: dict[str, Any] | None, num_classes: int) -> None:
  """Refuses to resume with another teacher than the run's so far: teacher.checkpoint may
  change on resume (its files moved), the teacher's weights may not."""
  teacher_path = os.path.expanduser(teacher_path)
  recorded = saved_meta.get("teacher_logits_checksum")
  if checksum is None:  # no teacher
    return
  if not checkpoint.verifiable(recorded):  # a run of a version before 2026-11-29
    logging.warning(
        "This run's checkpoints, written by an older sortkd-jax, record no teacher checksum "
        "that can be checked: nothing tells whether %s is the teacher it was distilled from so "
        "far. Resume only with that teacher.", teacher_path)
    return
  if not checkpoint.same_logits(recorded, checksum, num_classes):
    raise ValueError(
        f"The teacher {teacher_path} is not the one this run was distilled from so far (its "
        f"logits checksum: {checkpoint.describe_checksum(checksum)}; the run's teacher: "
        f"{checkpoint.describe_checksum(recorded)}). teacher.checkpoint may change on resume "
        "only to where the same weights are now; for another teacher, use a new --workdir."
        + (_teacher_run_advice(teacher_path, saved_meta.get("teacher_run_epoch"))
           if checkpoint.is_train_workdir(teacher_path) else ""))


def _teacher_run_advice(teacher_path: str, distilled_from: int | None) -> str:
  """What to pass for a run as teacher whose best epoch has changed since this run began: the
  epoch it was distilled from (recorded by checkpoints since 2026-11-30), if still kept."""
  kept = checkpoint.saved_epochs(teacher_path)
  epochs = os.path.join(teacher_path, checkpoint.TRAIN_CHECKPOINT_DIR)
  if distilled_from is None:
    return (" A run as teacher means its best epoch, which changes if that run trains on: pass "
            f"the epoch this run was distilled from, if {teacher_path} still keeps it (epochs "
            f"{kept}), as --config.teacher.checkpoint={os.path.join(epochs, 'EPOCH')} (the run's "
            "log names it: 'Teacher: the student of epoch ...').")
  if distilled_from in kept:
    return (f" This run was distilled from epoch {distilled_from} of that run: pass "
            f"--config.teacher.checkpoint={os.path.join(epochs, str(distilled_from))}.")
  return (f" This run was distilled from epoch {distilled_from} of that run, which it no longer "
          f"keeps (it keeps epochs {kept}), so this run cannot be resumed with its teacher. Next "
          "time, let a teacher's run finish first, or freeze the epoch used as a file "
          "(scripts/export_weights.py).")


# Recorded as absolute paths: eval.py, and a run taking this one as its teacher, read the run's
# config.json from other working directories. (All may change on a resume.)
_PATH_FIELDS = ("data.folder", "data.data_dir", "data.cache_dir", "data.manual_dir",
                "teacher.checkpoint")


def _as_recorded(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config` as config.json records it: JSON, its `_PATH_FIELDS` absolute."""
  recorded = json.loads(config.to_json_best_effort())
  for field in _PATH_FIELDS:
    group, name = field.split(".")
    value = recorded.get(group, {}).get(name)
    if value and "://" not in value:  # not a URL, such as tfds's gs://bucket/... data_dir
      recorded[group][name] = os.path.abspath(os.path.expanduser(value))
  return recorded


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Process 0 replaces config.json whole: the other processes may be reading it."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(_as_recorded(config), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def check_same_data(epoch: int, saved_meta: dict[str, Any], data_record: dict[str, int]
                    ) -> None:
  """Refuses to resume on other data than the checkpoint's (`data.folder` pointed elsewhere, or
  images added to it) where the steps per epoch stay the same: the epochs would train on other
  data, and the best top-1 compare tests on other images. `data_record`: the image counts and,
  for splits held on the device, their CRCs (of pixels, labels and order: a moved folder
  resumes). Checkpoints of versions before 2026-11-30 record neither."""
  changed = []
  for split in ("train", "test"):
    was, now = (saved_meta.get(f"{split}_examples"), data_record[f"{split}_examples"])
    crcs = (saved_meta.get(f"{split}_crc32"), data_record.get(f"{split}_crc32"))
    if was is not None and was != now:
      changed.append(f"{split} images: {was} then, {now} now")
    elif None not in crcs and crcs[0] != crcs[1]:
      changed.append(f"{split} images: as many, but other pixels, labels or order")
  if changed:
    raise ValueError(
        f"The checkpoint of epoch {epoch} was trained and tested on other data ("
        f"{'; '.join(changed)}): the data changed since. Resume with the run's own data, or "
        "train in a new --workdir.")


def check_steps_per_epoch(step: int, epoch: int, steps_per_epoch: int) -> None:
  """Refuses to resume when an epoch has another number of steps than when the checkpoint was
  taken: the learning-rate boundaries and the epoch-based weights (DKD's warm-up, CTKD's λ)
  count steps, so the run would silently follow another schedule."""
  if step != epoch * steps_per_epoch:
    raise ValueError(
        f"The checkpoint of epoch {epoch} was taken at step {step} ({step / epoch:g} steps "
        f"per epoch), but an epoch now has {steps_per_epoch} steps: the training data or the "
        "device count changed since (an epoch's last batch is rounded down to a multiple of "
        "the device count). Resume with the run's own data and device count, or train in a "
        "new --workdir.")
