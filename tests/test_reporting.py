"""Run output across an interruption: what a resumed run logs again is not kept twice."""

import glob
import json
import os

import numpy as np
import pytest

from sortkd_jax import reporting


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["kind"], r["step"], r["loss"]) for r in map(json.loads, f)]


def _tensorboard_losses(workdir):
  """(kind, step, loss) as TensorBoard shows them: a writer's START event at step p hides what
  was logged before it at steps >= p (SummaryWriter's purge_step)."""
  import tensorflow as tf
  shown = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")),
                     key=os.path.getmtime):
    for e in tf.compat.v1.train.summary_iterator(path):
      if e.HasField("session_log") and e.session_log.status == e.session_log.START:
        shown = [s for s in shown if s[1] < e.step]
      shown += [(v.tag.split("/")[0], e.step, v.simple_value) for v in e.summary.value]
  return shown


def test_restart_drops_what_was_logged_after_the_resumed_step(tmp_path):
  first = reporting.Reporter(str(tmp_path), total_steps=100)
  for kind, step in (("teacher", 0), ("train", 4), ("epoch", 8), ("train", 12)):  # then cut
    first.write(kind, 1 + step // 9, step, {"loss": 1.0})
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "epoch": 2, "st')  # a record cut short by a crash

  resumed = reporting.Reporter(str(tmp_path), total_steps=100, start_step=8)
  resumed.write("train", 2, 12, {"loss": 2.0})
  resumed.close()
  assert _records(tmp_path) == [("teacher", 0, 1.0), ("train", 4, 1.0), ("epoch", 8, 1.0),
                                ("train", 12, 2.0)]
  assert _tensorboard_losses(tmp_path) == _records(tmp_path)  # step 8 kept, not logged again

  # No checkpoint: the run starts afresh, teacher evaluation included.
  fresh = reporting.Reporter(str(tmp_path), total_steps=100)
  fresh.close()
  assert _records(tmp_path) == [] and _tensorboard_losses(tmp_path) == []


def test_a_record_cut_short_of_its_newline_alone_is_kept_and_ended(tmp_path):
  """A crash between a record and its newline left a whole record that the resumed run's next
  one was written onto: one line of two objects, which every JSON-lines reader refuses."""
  first = reporting.Reporter(str(tmp_path), total_steps=100)
  first.write("train", 1, 4, {"loss": 1.0})
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"kind": "epoch", "epoch": 1, "step": 8, "loss": 1.0}))  # no newline
  resumed = reporting.Reporter(str(tmp_path), total_steps=100, start_step=8)
  resumed.write("train", 2, 12, {"loss": 2.0})
  resumed.close()
  assert _records(tmp_path) == [("train", 4, 1.0), ("epoch", 8, 1.0), ("train", 12, 2.0)]


def test_a_run_resumed_after_its_end_loses_its_end_record(tmp_path):
  """A finished run extended (a raised num_epochs) has not ended: its old `"end"` record, at
  the resumed step, would say it had (and a jq `select(.kind == "end")` would print two)."""
  first = reporting.Reporter(str(tmp_path), total_steps=16)
  for kind, step in (("train", 4), ("epoch", 8), ("epoch", 16), ("end", 16)):
    first.write(kind, 1 + (step - 1) // 8, step, {"loss": 1.0})
  first.close()
  extended = reporting.Reporter(str(tmp_path), total_steps=24, start_step=16)
  extended.close()
  assert _records(tmp_path) == [("train", 4, 1.0), ("epoch", 8, 1.0), ("epoch", 16, 1.0)]


def test_throughput_and_eta_count_only_the_timed_steps(tmp_path, monkeypatch):
  clock = iter([10.0, 12.0, 13.0, 13.5])  # start, then readings
  monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
  reporter = reporting.Reporter(str(tmp_path), total_steps=100)
  assert reporter.throughput(5, 40) == (None, None)  # no window open yet (compiling)
  reporter.start_timing(4, 32)
  # 10 steps in 2 s: 9 batches of 8 images and an epoch's last batch of 6.
  img_s, eta_s = reporter.throughput(14, 32 + 9 * 8 + 6)
  assert img_s == 39.0 and eta_s == (100 - 14) / 5
  # The next window starts where that one ended: 2 steps of 10 images in 1 s.
  assert reporter.throughput(16, 130) == (20.0, (100 - 16) / 2)
  assert reporter.throughput(16, 130) == (None, None)  # no step since: nothing to measure
  reporter.stop_timing()  # evaluation and saving are left out
  assert reporter.throughput(20, 160) == (None, None)
  reporter.write("epoch", 1, 14, {"loss": np.float32(0.5), "img_per_s": img_s, "note": None,
                                  "test_examples": np.int64(7)})
  reporter.close()
  [record] = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert record == {"kind": "epoch", "epoch": 1, "step": 14, "loss": 0.5, "img_per_s": 39.0,
                    "note": None, "test_examples": 7}
  assert isinstance(record["test_examples"], int)  # a count, as eval.py prints it
  # TensorBoard gets the float metrics, at their step.
  import tensorflow as tf
  [events] = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  scalars = {(v.tag, e.step, v.simple_value) for e in tf.compat.v1.train.summary_iterator(events)
             for v in e.summary.value}
  assert scalars == {("epoch/loss", 14, 0.5), ("epoch/img_per_s", 14, 39.0)}


def test_a_non_finite_value_is_written_as_json_null(tmp_path):
  """metrics.jsonl stays strict JSON when a loss diverges (the teacher's record, written before
  the run stops on it)."""
  reporter = reporting.Reporter(str(tmp_path), total_steps=10)
  reporter.write("teacher", 0, 0, {"test_loss": np.float32("nan"), "test_top1": 0.0,
                                   "nested": {"a": [float("inf"), 1]}})
  reporter.close()
  with open(tmp_path / "metrics.jsonl") as f:
    record = json.loads(f.read(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
  assert record == {"kind": "teacher", "epoch": 0, "step": 0, "test_loss": None,
                    "test_top1": 0.0, "nested": {"a": [None, 1]}}


def test_a_full_disk_names_the_run_s_metrics_and_what_to_do(tmp_path):
  reporter = reporting.Reporter(str(tmp_path), total_steps=10)
  reporter._jsonl.close()
  reporter._jsonl = open("/dev/full", "a")  # every write: ENOSPC, as on a full disk
  with pytest.raises(OSError, match=(
      rf"^\[Errno 28\] No space left on device: writing the run's metrics in {tmp_path} "
      r"\(metrics.jsonl, tensorboard/\) failed. Once that is fixed \(free space, say\), re-run "
      r"the same command: it resumes after the last epoch saved.$")):
    reporter.write("train", 1, 1, {"loss": 1.0})
  with pytest.raises(OSError, match="No space left on device: writing the run's metrics"):
    reporter.close()  # closing flushes the line that could not be written: the same failure


def test_the_commit_of_another_user_s_checkout_is_recorded(monkeypatch):
  """git refuses a checkout of another owner (a lab's shared one) as "dubious": runs from it
  recorded no commit. GIT_TEST_ASSUME_DIFFERENT_OWNER is git's own way to test that case."""
  ours = reporting.source_commit()
  monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
  assert reporting.source_commit() == ours
  root = os.path.dirname(os.path.dirname(os.path.abspath(reporting.__file__)))
  if os.path.exists(os.path.join(root, ".git")):  # a checkout (CI's clone), not an installed copy
    assert ours is not None
