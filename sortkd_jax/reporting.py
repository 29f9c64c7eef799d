"""Run output: metrics.jsonl, TensorBoard events and readable console lines (process 0 only).

big_vision-style: one JSON object per log period and per epoch in `<workdir>/metrics.jsonl`,
`[train] epoch E, step S: name = value, ...` lines on the console, images/s and ETA that leave
compilation, evaluation and checkpointing out.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import jax
from absl import logging


def parse_flags_briefly(argv: list[str]) -> list[str]:
  """absl's flag parsing for the scripts, with a config error in one line, not a traceback.

  `app.run(main, flags_parser=parse_flags_briefly)`: ml_collections reports errors in config
  files (e.g. an unknown pair) with the file's traceback; the last line says what is wrong.
  """
  from absl import flags
  try:
    argv = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS.config.to_dict()  # a config that failed to load raises only when read
    return argv
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    sys.exit(_unknown_field_message(e))
  except (flags.Error, OSError) as e:
    while isinstance(e.__cause__ or e.__context__, (flags.Error, OSError)):
      e = e.__cause__ or e.__context__  # the first failure, e.g. the missing config file
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    sys.exit(f"error: {last.split(': ', 1)[-1] if last.startswith('ValueError') else last}")


def define_config_flag(default: str | None, help_string: str, **kwargs: Any) -> None:
  """`--config`, an ml_collections config file, whose errors `parse_flags_briefly` reports.

  With a default, ml_collections loads it and applies the command line's `--config.*`
  overrides at once, when the flag is defined: an override typo fails here, not in absl's parse.
  """
  from ml_collections import config_flags
  try:
    config_flags.DEFINE_config_file("config", default, help_string, **kwargs)
  except (AttributeError, KeyError) as e:
    sys.exit(_unknown_field_message(e))


def _unknown_field_message(e: Exception) -> str:
  guess = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', str(e))
  return (f"error: the config has no field {guess[2]!r}; did you mean {guess[1]!r}?"
          if guess else f"error: unknown config field ({e}).")


def quiet_library_info_logs() -> None:
  """Keeps the console readable: orbax's and tfds' INFO chatter is dropped, warnings stay."""
  import logging as std_logging

  class _Filter(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or not any(
          f"/{lib}/" in record.pathname for lib in ("orbax", "tensorflow_datasets", "etils"))

  logging.get_absl_handler().addFilter(_Filter())


class Reporter:
  """Writes metrics from process 0; every other process only keeps time."""

  def __init__(self, workdir: str, total_steps: int, batch_size: int):
    self._is_writer = jax.process_index() == 0
    self._total_steps = total_steps
    self._batch_size = batch_size
    self._jsonl = None
    self._tb = None
    self._window_start: tuple[float, int] | None = None
    if self._is_writer:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events are written.")

  @property
  def timing(self) -> bool:
    return self._window_start is not None

  def start_timing(self, step: int) -> None:
    """Starts a throughput window (after a dispatch finished, so compiling is left out)."""
    self._window_start = (time.perf_counter(), step)

  def stop_timing(self) -> None:
    """Leaves what follows (evaluation, saving, the next compilation) out of throughput."""
    self._window_start = None

  def throughput(self, step: int) -> tuple[float | None, float | None]:
    """Images/s since the last call and the ETA in seconds, then opens a new window."""
    if self._window_start is None:
      return None, None
    t0, s0 = self._window_start
    now = time.perf_counter()
    self._window_start = (now, step)
    if step <= s0 or now <= t0:
      return None, None
    steps_per_s = (step - s0) / (now - t0)
    return steps_per_s * self._batch_size, (self._total_steps - step) / steps_per_s

  def write(self, kind: str, epoch: int, step: int, metrics: dict[str, Any]) -> None:
    if not self._is_writer:
      return
    record = {"kind": kind, "epoch": epoch, "step": step,
              **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in record.items():
        if isinstance(value, float) and name not in ("epoch", "step"):
          self._tb.add_scalar(f"{kind}/{name}", value, step)
      self._tb.flush()
    shown = ", ".join(f"{k} = {_fmt(v)}" for k, v in metrics.items() if v is not None)
    logging.info("[%s] epoch %d, step %d: %s", kind, epoch, step, shown)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value)
