"""scripts/benchmark.py runs on CPU at tiny sizes and prints one JSON object per measurement."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_script_reports_every_measurement(tmp_path):
  out_file = tmp_path / "bench.jsonl"
  cmd = [sys.executable, "scripts/benchmark.py", "--config", "configs/cifar_kd.py:res56_res20",
         "--config.student.name=resnet8", "--config.teacher.name=resnet8",
         "--config.eval_batch_size=64", "--num-examples=256", "--batch-size=32",
         "--steps-per-dispatch=2", "--windows=2", "--window-seconds=0.05", "--breakdown",
         f"--json={out_file}", f"--profile={tmp_path / 'trace'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in out_file.read_text().splitlines()]
  kinds = [r["measurement"] for r in records]
  assert kinds == ["train_step", "profile_train_step", "eval_student", "part_augment",
                   "part_teacher_forward", "part_teacher_targets",
                   "part_student_step_without_teacher"]
  for r in records:
    assert r["images_per_s"] > 0 and r["device"] and r["jax"]
  train_step = records[0]
  assert (train_step["batch_size"], train_step["steps_per_dispatch"]) == (32, 2)
  assert train_step["compile_s"] > 0 and train_step["sort"] is True
  profile = records[1]
  assert profile["op_ms_per_call"] > 0 and profile["ops_per_call"] > 10
  assert any("conv" in name for name, _, _ in profile["top_ops"])
  assert os.path.exists(profile["trace"])
  assert records[2]["eval_images"] == 256
  assert "train_step" in proc.stdout and "images/s" in proc.stdout  # the readable table
