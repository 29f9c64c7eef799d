"""Run output across an interruption: what a resumed run logs again is not kept twice."""

import json
import os

from sortkd_jax import reporting


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["kind"], r["step"], r["loss"]) for r in map(json.loads, f)]


def test_restart_drops_what_was_logged_after_the_resumed_step(tmp_path):
  first = reporting.Reporter(str(tmp_path), total_steps=100, batch_size=8)
  for kind, step in (("train", 4), ("epoch", 8), ("train", 12)):  # then interrupted
    first.write(kind, 1 + step // 9, step, {"loss": 1.0})
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "epoch": 2, "st')  # a record cut short by a crash

  resumed = reporting.Reporter(str(tmp_path), total_steps=100, batch_size=8, start_step=8)
  resumed.write("train", 2, 12, {"loss": 2.0})
  resumed.close()
  assert _records(tmp_path) == [("train", 4, 1.0), ("epoch", 8, 1.0), ("train", 12, 2.0)]

  fresh = reporting.Reporter(str(tmp_path), total_steps=100, batch_size=8)  # no checkpoint
  fresh.close()
  assert _records(tmp_path) == []
