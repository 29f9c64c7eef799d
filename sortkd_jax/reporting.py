"""Run output: metrics.jsonl, TensorBoard events and readable console lines (process 0 only).

big_vision-style: one JSON object per log period and per epoch in `<workdir>/metrics.jsonl`
(and one per (re)start saying what it runs on, and the teacher's, before epoch 1),
`[train] epoch E, step S: name = value, ...` lines on the console, images/s and ETA that leave
compilation, evaluation and checkpointing out.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Iterator

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class Reporter:
  """Writes metrics from process 0; every other process only keeps time."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
    """`start_step`: the step the run (re)starts from. What an interrupted run logged after it
    is dropped, as it is about to be logged again; from step 0, that is everything (the
    teacher's record at step 0 too). So is an `"end"` record: a run resumed after its end (a
    raised num_epochs) has not ended, and its start record names the change."""
    self._is_writer = jax.process_index() == 0
    self._workdir = workdir
    self._total_steps = total_steps
    self._jsonl = None
    self._tb = None
    self._window_start: tuple[float, int, int] | None = None  # (time, step, images)
    if self._is_writer:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, METRICS_FILE)
      kept_up_to = start_step if start_step > 0 else -1
      _drop_records_after(path, kept_up_to)
      self._jsonl = open(path, "a")
      try:
        from tensorboardX import SummaryWriter
        # Named by its purge step too: tensorboardX names files by the second, and a restart
        # within it may then replace only a file whose events it hides anyway.
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                 purge_step=kept_up_to + 1, filename_suffix=f".{kept_up_to + 1}")
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events are written.")

  @property
  def timing(self) -> bool:
    return self._window_start is not None

  def start_timing(self, step: int, images: int) -> None:
    """Starts a throughput window (after a dispatch finished, so compiling is left out).

    `images`: how many images the run has trained on so far, counted exactly (an epoch's last
    batch is smaller), like `step`.
    """
    self._window_start = (time.perf_counter(), step, images)

  def stop_timing(self) -> None:
    """Leaves what follows (evaluation, saving, the next compilation) out of throughput."""
    self._window_start = None

  def throughput(self, step: int, images: int) -> tuple[float | None, float | None]:
    """Images/s since the last call and the ETA in seconds, then opens a new window."""
    if self._window_start is None:
      return None, None
    t0, s0, i0 = self._window_start
    now = time.perf_counter()
    self._window_start = (now, step, images)
    if step <= s0 or now <= t0:
      return None, None
    steps_per_s = (step - s0) / (now - t0)
    return (images - i0) / (now - t0), (self._total_steps - step) / steps_per_s

  def write(self, kind: str, epoch: int, step: int, metrics: dict[str, Any]) -> None:
    if not self._is_writer:
      return
    record = {"kind": kind, "epoch": epoch, "step": step,
              **{k: _plain(v) for k, v in metrics.items()}}
    with self._failed_write_explained():
      self._jsonl.write(json_line(record) + "\n")
      self._jsonl.flush()
      if self._tb is not None:
        for name, value in record.items():
          if isinstance(value, float) and name not in ("epoch", "step"):
            self._tb.add_scalar(f"{kind}/{name}", value, step)
        self._tb.flush()
    shown = ", ".join(f"{k} = {_fmt(v)}" for k, v in metrics.items() if v is not None)
    logging.info("[%s] epoch %d, step %d: %s", kind, epoch, step, shown)

  def write_start(self, epoch: int, step: int,
                  config_changes: dict[str, tuple[Any, Any]]) -> None:
    """Records what this start (or resume, at `step`) runs on, `run_environment()`, and the
    config fields it changed, `{field: (was, now)}` (config.json holds only the latest)."""
    if self._is_writer:
      environment = run_environment()
      if step > 0:
        _warn_if_random_settings_changed(os.path.join(self._workdir, METRICS_FILE), environment)
      self.write("start", epoch, step, {**environment, "config_changes": config_changes})

  def close(self) -> None:
    with self._failed_write_explained():
      try:
        if self._jsonl is not None:
          self._jsonl.close()
      finally:
        if self._tb is not None:
          self._tb.close()

  @contextlib.contextmanager
  def _failed_write_explained(self) -> Iterator[None]:
    """A failed write (a full disk, say) names the run's metrics and what to do: bare, it said
    only `[Errno 28] No space left on device`."""
    try:
      yield
    except OSError as e:
      raise OSError(e.errno, f"{e.strerror}: writing the run's metrics in {self._workdir} "
                    "(metrics.jsonl, tensorboard/) failed. Once that is fixed (free space, "
                    "say), re-run the same command: it resumes after the last epoch saved.") from e


# JAX's settings that change every random draw (crops, flips, epoch orders) of a run.
RANDOM_SETTINGS = ("jax_default_prng_impl", "jax_threefry_partitionable")


def _warn_if_random_settings_changed(path: str, environment: dict[str, Any]) -> None:
  """A resume under other RANDOM_SETTINGS than the run's first start goes on as another run."""
  with open(path) as f:  # the reporter opened it, and dropped a cut last line
    first = next((r for r in map(json.loads, f) if r.get("kind") == "start"), {})
  changed = [f"{name}={first[name]!r} -> {environment[name]!r}" for name in RANDOM_SETTINGS
             if name in first and first[name] != environment[name]]
  if changed:
    logging.warning("This run started under other random-number settings of JAX (%s): from here "
                    "on it draws other crops, flips and epoch orders than it would have; set them "
                    "as they were to resume it exactly.", "; ".join(changed))


def run_environment() -> dict[str, Any]:
  """What a run's numbers depend on besides its config: the command, the code (sortkd-jax's
  version and, run from a git checkout, its commit, `-dirty` with uncommitted changes), the
  libraries that compute (TensorFlow and tfds where the input used them), the devices, and what
  decides TF32 or not on NVIDIA GPUs (JAX's default matmul precision, None: TF32 on GPUs that
  have it; NVIDIA_TF32_OVERRIDE; XLA_FLAGS). Each resume records its own: it may run elsewhere."""
  env = {"argv": sys.argv, "sortkd_jax": _installed_version("sortkd-jax"),
         "git": source_commit(), "python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    env[name.replace("-", "_")] = _installed_version(name)
  for module in ("tensorflow", "tensorflow_datasets"):  # looked up, never imported here
    if module in sys.modules:
      env[module] = getattr(sys.modules[module], "__version__", None)
  device = jax.devices()[0]
  return {**env, "platform": device.platform, "device_kind": device.device_kind,
          "devices": jax.device_count(), "processes": jax.process_count(),
          "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
          **{name: jax.config.values.get(name) for name in RANDOM_SETTINGS},  # transient flags
          "jax_enable_x64": jax.config.jax_enable_x64,
          "nvidia_tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE"),
          "xla_flags": os.environ.get("XLA_FLAGS")}


def _installed_version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def source_commit() -> str | None:
  """`git describe --always --dirty` of the checkout this package runs from; None for an
  installed copy, or without git.

  A checkout of another user's (a lab's shared one) is read too: git refuses repositories of
  other owners unless they are "safe directories", lest their config run commands, and this
  one's code is running already."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(root, ".git")):
    return None
  try:
    done = subprocess.run(["git", "-c", "safe.directory=*", "-C", root, "describe",
                           "--always", "--dirty", "--abbrev=12"],
                          capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  if done.returncode != 0:
    return None
  return done.stdout.strip() or None


def _drop_records_after(path: str, step: int) -> None:
  """Keeps the records up to `step` but the `"end"` one; a line cut short by a crash goes too.
  A complete record that lacks only its newline is kept and given one: the next record would
  otherwise be written onto its line."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()

  def keeps(line: str) -> bool:
    try:
      record = json.loads(line)
      return record["step"] <= step and record["kind"] != "end"
    except (ValueError, KeyError, TypeError):
      return False

  kept = [line.rstrip("\n") + "\n" for line in lines if keeps(line)]
  if kept != lines:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def json_line(record: dict[str, Any]) -> str:
  """`record` as one line of strict JSON. JSON has no NaN or Infinity (Python writes them; jq
  and most readers refuse the line), so a non-finite number, e.g. a diverged loss, is null."""
  return json.dumps(_finite_or_null(record), allow_nan=False)


def _finite_or_null(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v) for v in value]
  value = _plain(value)
  return None if isinstance(value, float) and not math.isfinite(value) else value


def _plain(value: Any) -> Any:
  """A JSON value: NumPy/JAX scalars as Python numbers (counts stay integers)."""
  return value.item() if hasattr(value, "item") else value


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value)
