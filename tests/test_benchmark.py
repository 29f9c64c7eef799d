"""scripts/benchmark.py runs on CPU at tiny sizes and prints one JSON object per measurement."""

import json
import os

from helpers import run_script


def test_benchmark_script_reports_every_measurement(tmp_path):
  out_file = tmp_path / "bench.jsonl"
  # --steps-per-dispatch overrides the config's 2 (whose lax.scan is >10x slower on XLA:CPU).
  proc = run_script(
      "benchmark.py", "--config", "configs/cifar_kd.py:res56_res20",
      "--config.student.name=resnet8", "--config.teacher.name=resnet8",
      "--config.eval_batch_size=64", "--config.steps_per_dispatch=2", "--num-examples=256",
      "--batch-size=32", "--steps-per-dispatch=1", "--windows=2", "--window-seconds=0.05",
      "--breakdown", f"--json={out_file}", f"--profile={tmp_path / 'trace'}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in out_file.read_text().splitlines()]
  kinds = [r["measurement"] for r in records]
  assert kinds == ["train_step", "profile_train_step", "eval_student", "part_augment",
                   "part_teacher_forward", "part_teacher_targets",
                   "part_student_step_without_teacher"]
  for r in records:
    assert r["images_per_s"] > 0 and r["device"] and r["jax"]
  train_step = records[0]
  assert (train_step["batch_size"], train_step["steps_per_dispatch"]) == (32, 1)
  assert train_step["compile_s"] > 0 and train_step["sort"] is True
  profile = records[1]
  assert profile["op_ms_per_call"] > 0 and profile["ops_per_call"] > 10
  assert any("conv" in name for name, _, _ in profile["top_ops"])
  assert os.path.exists(profile["trace"])
  assert records[2]["eval_images"] == 256
  assert "train_step" in proc.stdout and "images/s" in proc.stdout  # the readable table
