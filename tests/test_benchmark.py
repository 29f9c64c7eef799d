"""scripts/benchmark.py runs on CPU at tiny sizes and prints one JSON object per measurement."""

import json
import os
import re
import textwrap

import numpy as np
import pytest
from helpers import REPO, check_script_command, run_python, run_script, script_commands

from sortkd_jax import reporting


def test_benchmark_script_reports_every_measurement(tmp_path):
  out_file = tmp_path / "bench.jsonl"
  # --steps-per-dispatch overrides the config's 2 (whose lax.scan is >10x slower on XLA:CPU);
  # spelt --steps_per_dispatch, as train.py's flags are: both spellings work.
  proc = run_script(
      "benchmark.py", "--config", "configs/cifar_kd.py:res56_res20",
      "--config.student.name=resnet8", "--config.teacher.name=resnet8",
      "--config.eval_batch_size=96", "--config.steps_per_dispatch=2", "--num-examples=256",
      "--batch-size=32", "--steps_per_dispatch=1", "--windows=2", "--window-seconds=0.05",
      "--breakdown", f"--json={out_file}", f"--profile={tmp_path / 'trace'}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in out_file.read_text().splitlines()]
  kinds = [r["measurement"] for r in records]
  assert kinds == ["train_step", "profile_train_step", "eval_student", "part_augment",
                   "part_teacher_forward", "part_teacher_targets",
                   "part_student_step_without_teacher"]
  for r in records:
    assert r["images_per_s"] > 0 and r["device"] and r["jax"]
    assert r["git"] == reporting.source_commit() and re.fullmatch(r"20\d\d-.*Z", r["date"])
  train_step = records[0]
  assert (train_step["batch_size"], train_step["steps_per_dispatch"]) == (32, 1)
  assert train_step["compile_s"] > 0 and train_step["sort"] is True
  profile = records[1]
  assert profile["op_ms_per_call"] > 0 and profile["ops_per_call"] > 10
  assert any("conv" in name for name, _, _ in profile["top_ops"])
  assert os.path.exists(profile["trace"])
  # Whole eval batches: 256 images at 96 are 3 batches, 32 of whose 96 last images (padding)
  # were computed but not counted.
  assert (records[2]["eval_images"], records[2]["eval_batch_size"]) == (192, 96)
  assert "train_step" in proc.stdout and "images/s" in proc.stdout  # the readable table


def test_the_parts_of_the_step_are_split_over_the_devices_as_the_trainer_splits_them():
  """--breakdown's parts on the replicated CIFAR split ran the whole batch on every device,
  where the trainer gives each device its share."""
  proc = run_python("-c", textwrap.dedent("""
      import sys
      sys.argv = ["benchmark.py", "--config.student.name=resnet8", "--config.teacher.name=resnet8",
                  "--num-examples=32", "--batch-size=8", "--steps-per-dispatch=2"]
      sys.path.insert(0, "scripts")
      import benchmark, jax
      benchmark.FLAGS(sys.argv)
      for name, (fn, args, count) in benchmark.step_parts(benchmark.setup()).items():
        out = jax.tree.leaves(fn(*args))[0]
        print(name, count, out.shape[0], [s.data.shape[0] for s in out.addressable_shards])
      """), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ["augment 8 8 [4, 4]", "teacher_forward 16 16 [8, 8]",
                                      "teacher_targets 16 16 [8, 8]"]


@pytest.mark.parametrize("flag,target,message", [
    ("json", "", "is a directory; name a file"),
    ("json", "file.txt/bench.jsonl", "file.txt is a file, so the JSON file cannot be made"),
    ("profile", "file.txt", "is a file; name a directory for the trace"),
    ("profile", "file.txt/trace", "file.txt is a file, so the trace directory cannot be made"),
    ("json", "~/file.txt/bench.jsonl", "file.txt is a file, so the JSON file cannot be made"),
])
def test_unwritable_output_paths_are_refused_before_any_timing(tmp_path, flag, target, message):
  """Otherwise the error (IsADirectoryError, a traceback) came after the whole benchmark. A
  quoted `~` is the home folder (it made a folder named `~`)."""
  (tmp_path / "file.txt").write_text("not a directory")
  proc = run_script(
      "benchmark.py", "--config.student.name=resnet8", "--config.teacher.name=resnet8",
      "--num-examples=32", "--batch-size=32", "--steps-per-dispatch=1", "--noeval",
      "--windows=1", "--window-seconds=0.01", f"--{flag}",
      target if target.startswith("~") else tmp_path / target, env={"HOME": str(tmp_path)},
      cwd=tmp_path, timeout=600)
  assert proc.returncode == 1 and f"error: --{flag} " in proc.stderr, proc.stderr[-3000:]
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert "train_step" not in proc.stdout  # refused before any timing
  assert (tmp_path / "file.txt").read_text() == "not a directory"


def test_a_bad_config_is_refused_as_the_trainer_refuses_it():
  """The trainer's checks (train.check_config), before any compilation or timing."""
  proc = run_script("benchmark.py", "--config.teacher.name=resnet9", "--noeval", timeout=600)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "error: Unknown config.teacher.name 'resnet9'" in proc.stderr
  proc = run_script("benchmark.py", "--config.data.pipeline=tf_data", "--noeval", timeout=600)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "error: config.data.pipeline='tf_data' is the ImageNet recipes' stream" in proc.stderr
  assert "train_step" not in proc.stdout
  proc = run_script("benchmark.py", "--config.method=kdd", "--noeval", timeout=600)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "error: Unknown config.method 'kdd'" in proc.stderr
  proc = run_script("benchmark.py", "--batch-size=8", "--num-examples=4", "--noeval", timeout=600)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      "error: --num-examples 4 is smaller than the batch size 8: raise it to at least the batch "
      "size, or lower --batch-size."), proc.stderr[-3000:]


def test_teacher_stream_groups_divide_the_steps_per_dispatch_flag(tmp_path):
  """--steps-per-dispatch is what config.teacher_stream_groups must divide, as it is what runs
  (the config's steps, unset on CPU, mean one step)."""
  out_file = tmp_path / "bench.jsonl"
  args = ("benchmark.py", "--config.student.name=resnet8", "--config.teacher.name=resnet8",
          "--num-examples=16", "--batch-size=8", "--config.teacher_stream_groups=2", "--noeval",
          "--windows=1", "--window-seconds=0.01", f"--json={out_file}")
  proc = run_script(*args, "--steps-per-dispatch=2", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out_file.read_text())
  assert (record["steps_per_dispatch"], record["teacher_stream_groups"]) == (2, 2)
  assert "teacher in 2 stream groups" in proc.stdout
  # More steps than an epoch of 16 images holds: the trainer's dispatch has 2 (3 repeated a batch).
  proc = run_script(*args, "--steps-per-dispatch=3", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out_file.read_text().splitlines()[-1])
  assert (record["steps_per_dispatch"], record["teacher_stream_groups"]) == (2, 2)
  assert ("An epoch of --num-examples 16 at batch 8 has 2 full steps, the most the trainer puts "
          "in one dispatch: timing dispatches of that many.") in proc.stdout
  proc = run_script(*args, timeout=600)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert ("error: config.teacher_stream_groups must be a positive integer that divides the 1 steps "
          "of a dispatch (config.steps_per_dispatch, unset: 32 on GPUs/TPUs, 1 on CPUs; ")\
      in proc.stderr  # a GPU run's config resumed on a CPU


def _jpeg_folder(root, count=8, size=(80, 96)):
  """<root>/train/<class>/<i>.jpg: a tiny ImageNet-style folder of two classes."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    os.makedirs(root / "train" / name)
    for i in range(count):
      Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
          root / "train" / name / f"{i}.jpg")
  return str(root)


def test_benchmark_of_an_imagenet_recipe_times_the_step_and_the_input_pipeline(tmp_path):
  out_file = tmp_path / "bench.jsonl"
  args = ["--config", "configs/imagenet_kd.py:r34_r18,runlocal",
          "--config.teacher.name=imagenet_ResNet18", "--windows=1",
          "--window-seconds=0.05", f"--json={out_file}"]
  missing = run_script("benchmark.py", *args, f"--config.data.folder={tmp_path / 'none'}")
  assert missing.returncode == 1 and "No split 'train' in image folder" in missing.stderr
  assert "--noinput times the device step alone" in missing.stderr
  assert not out_file.exists()  # refused before any timing
  chunked = run_script("benchmark.py", *args, "--steps-per-dispatch=4")
  assert chunked.returncode == 1 and "run one step per dispatch" in chunked.stderr

  proc = run_script("benchmark.py", *args, f"--config.data.folder={_jpeg_folder(tmp_path)}",
                    timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in out_file.read_text().splitlines()]
  assert [r["measurement"] for r in records] == ["train_step", "eval_student", "input_pipeline"]
  step, evaluation, stream = records
  assert (step["batch_size"], step["image_size"], step["steps_per_dispatch"]) == (8, 64, 1)
  assert step["student"] == "imagenet_ResNet18" and step["images_per_s"] > 0
  # The trainer's streaming evaluator, over two device batches of the eval batch size.
  assert evaluation["eval_images"] == 2 * evaluation["eval_batch_size"] > 0
  assert evaluation["images_per_s"] > 0
  assert stream["images_per_s"] > 0 and stream["host_cpus"] >= 1


def test_gpu_check_script_is_valid_bash():
  """scripts/gpu_check.sh runs only on a GPU machine; here at least it must parse."""
  import subprocess
  proc = subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr


def test_gpu_check_script_passes_only_flags_and_fields_that_exist():
  """A flag or config field renamed here would fail the device call (a scarce, timed one) after
  minutes of set-up: every flag that scripts/gpu_check.sh passes to benchmark.py and train.py is
  one they define, and every `--config.FIELD` a field of the recipe it goes with."""
  with open(os.path.join(REPO, "scripts", "gpu_check.sh")) as f:
    commands = script_commands(f.read())
  assert {name for name, _ in commands} == {"benchmark", "train"} and len(commands) >= 10
  for name, args in commands:
    assert re.search(r"--config configs/\w+\.py:\S+", args), args
    check_script_command(name, args, recipes=[])
