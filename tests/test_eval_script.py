"""scripts/eval.py: a wrong --checkpoint fails before the data is read, a run's evaluated epoch is
named, and a model with non-finite outputs is an error, not a result."""

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cifar_vanilla
from helpers import REPO, corrupt_arrays, run_python, run_script
from sortkd_jax import checkpoint, models

SYNTHETIC = ["--config", "configs/cifar_kd.py:res56_res20", "--config.data.name=synthetic",
             "--config.data.max_test_examples=64", "--config.eval_batch_size=32"]


def _resnet8(seed=0, nan=False):
  model = models.create_model("resnet8", 100, rngs=nnx.Rngs(seed))
  if nan:  # damaged weights: every logit is NaN
    model.fc.kernel[...] = jnp.full_like(model.fc.kernel[...], jnp.nan)
  return model


def _save_run(workdir, top1s, first_epoch=1):
  """A training workdir whose epochs first_epoch, ... have these test top-1s, as the trainer
  saves them (keeping the latest two and the best)."""
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, checkpoint.TRAIN_CHECKPOINT_DIR))
  for epoch, top1 in enumerate(top1s, first_epoch):
    _, params, stats = nnx.split(_resnet8(epoch), nnx.Param, nnx.BatchStat)
    state = {"params": {"student": nnx.to_pure_dict(params)},
             "batch_stats": nnx.to_pure_dict(stats), "step": jnp.int32(epoch)}
    ckpt.save(epoch, state, {"best_top1": max(top1s[:epoch - first_epoch + 1]),
                             "test_top1": top1, "step": epoch, "arch": "resnet8",
                             "num_classes": 100})
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cifar_vanilla.get_config().to_json_best_effort())
  return str(workdir)


def test_an_epoch_deleted_by_its_training_run_while_read_is_not_called_damaged(tmp_path,
                                                                              monkeypatch):
  """A run still training saves a better epoch and deletes its old best while eval.py (or
  export_weights.py, or a run using it as its teacher) reads that one: the new best is read.
  An epoch named by the user and deleted meanwhile is said to be gone, not damaged."""
  workdir = _save_run(tmp_path / "run", [50.0, 40.0])  # keeps 1 (the best) and 2
  restore = checkpoint.TrainCheckpointer.restore
  saved_during_reads = []  # for each coming read, the (first epoch, top1s) the run saves

  def restore_as_the_run_saves_a_better_epoch(self, epoch, target=None):
    if saved_during_reads:
      first_epoch, top1s = saved_during_reads.pop(0)
      _save_run(workdir, top1s, first_epoch=first_epoch)
    return restore(self, epoch, target)

  monkeypatch.setattr(checkpoint.TrainCheckpointer, "restore",
                      restore_as_the_run_saves_a_better_epoch)
  saved_during_reads.append((3, [60.0]))  # deleting epoch 1
  _, meta = checkpoint.load_student_from_workdir(workdir)
  assert (meta["epoch"], meta["best"], meta["test_top1"]) == (3, True, 60.0)
  assert checkpoint.saved_epochs(workdir) == [2, 3]
  saved_during_reads.append((4, [70.0]))  # deleting epoch 2
  with pytest.raises(FileNotFoundError, match=r"keeps no checkpoint of epoch 2; it keeps "
                     r"epochs 3, 4\.$"):
    checkpoint.load_student_from_workdir(workdir, epoch=2)
  # Epochs shorter than a read: each read loses its best epoch, 4, 6 then 8, to a better one.
  saved_during_reads.extend([(5, [10.0, 75.0]), (7, [10.0, 80.0]), (9, [10.0, 85.0])])
  with pytest.raises(ValueError, match=r"The run in .*run saved a better epoch, deleting its "
                     r"best while it was read, 3 times in a row \(epoch 8 last\): its epochs "
                     r"are shorter than a read\. Read it once it has ended\.$"):
    checkpoint.load_student_from_workdir(workdir)


def test_a_damaged_epoch_named_by_the_user_is_called_damaged(tmp_path):
  """Not taken for the best epoch of a live run, deleted as it was read, and read again."""
  workdir = _save_run(tmp_path / "run", [50.0, 40.0])  # keeps 1 (the best) and 2
  corrupt_arrays(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(ValueError, match=r"^The checkpoint of epoch 2, .*2, cannot be read "):
    checkpoint.load_student_from_workdir(workdir, epoch=2)


def test_a_checkpoint_this_user_cannot_read_is_not_called_damaged(tmp_path, monkeypatch):
  """Another user's epoch or model that this one may not read was called damaged, and the
  advice was to set the epoch aside (hiding a good best epoch of a shared run) or to port the
  model again; orbax words an unreadable folder as a missing _METADATA or another structure.
  (The tests run as root, who reads anything: the files are damaged and os.access denied.)"""
  import glob
  import pwd
  workdir = _save_run(tmp_path / "run", [50.0, 40.0])  # keeps 1 (the best) and 2
  model_dir = str(tmp_path / "model")
  checkpoint.save_model(model_dir, _resnet8(), arch="resnet8", num_classes=100)
  for epoch_dir in (os.path.join(workdir, "checkpoints", "2"), model_dir):
    corrupt_arrays(epoch_dir)
  array = sorted(glob.glob(os.path.join(workdir, "checkpoints", "2", "state", "**", "d", "*"),
                           recursive=True))[0]
  denied = {array, os.path.join(model_dir, "state"), os.path.join(model_dir, "sortkd_model.json")}
  access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
      os.path.abspath(path) not in denied and access(path, mode, **kw)))
  me = pwd.getpwuid(os.getuid()).pw_name

  def not_readable(path):
    return (rf"{re.escape(path)} is not readable by this user \(it belongs to {me}\): have that "
            r"changed \(chmod, chown\)\.$")

  with pytest.raises(ValueError, match=rf"^The checkpoint of epoch 2, .*2, cannot be read: "
                     rf"{not_readable(array)}"):
    checkpoint.load_student_from_workdir(workdir, epoch=2)
  with pytest.raises(ValueError, match=rf"^Could not restore the weights in .*model.* \(.*\)\. "
                     rf"{not_readable(os.path.join(model_dir, 'state'))}"):
    checkpoint.load_model(model_dir)

  def open_as_another_user(path, *args):
    if path in denied:
      raise PermissionError(13, "Permission denied", path)
    return open(path, *args)

  monkeypatch.setattr(checkpoint, "open", open_as_another_user, raising=False)
  meta_file = os.path.join(model_dir, "sortkd_model.json")
  with pytest.raises(ValueError, match=r"sortkd_model.json' is unreadable \(\[Errno 13\] "
                     rf"Permission denied: .*\)\. {not_readable(meta_file)}"):
    checkpoint.read_model_metadata(model_dir)


def test_reads_abandoned_by_a_failed_restore_report_nothing_later(tmp_path):
  """TensorStore finished the reads orbax abandoned and reported "Event loop is closed" from
  its threads, dozens of times, in whatever ran next; pytest's formatting of them there once
  crashed the run's last import with `SystemError: AST constructor recursion depth mismatch`.
  Other unraisable reports are still made. (In a fresh process: another test's abandoned
  reads may report at any time.)"""
  workdir = _save_run(tmp_path / "run", [50.0, 40.0])
  corrupt_arrays(os.path.join(workdir, "checkpoints", "2"))
  out = run_python("-c", f"""
import gc, sys, time, types
reported = []
sys.unraisablehook = lambda unraisable: reported.append(repr(unraisable.exc_value))
from sortkd_jax import checkpoint
for _ in range(3):
  try:
    checkpoint.load_student_from_workdir({workdir!r}, epoch=2)
  except ValueError as e:
    assert "cannot be read" in str(e), e
time.sleep(0.5)
gc.collect()
sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_traceback=None,
                   exc_value=RuntimeError("raised elsewhere"), err_msg=None, object=None))
print(reported)
""")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[\"RuntimeError('raised elsewhere')\"]"


def _last_json(out):
  """The printed line, read as strict JSON (which has no NaN or Infinity)."""
  return json.loads(out.stdout.strip().splitlines()[-1], parse_constant=_not_json)


def _not_json(name):
  raise ValueError(f"{name} is not JSON")


@pytest.mark.parametrize("kind,message", [
    ("missing", "does not exist"),
    ("run_without_epoch", "has no checkpoint yet: no epoch finished"),
    ("run_without_checkpoints", "has no checkpoint yet: no epoch finished"),
    ("checkpoints_folder", "is inside the training run"),
    ("image_folder", "is not a sortkd model checkpoint"),
    ("inside_a_model", "is inside the model checkpoint"),  # its state/, not "make one"
    ("run_file", "is a file of the training run in"),  # not "a PyTorch file damaged"
])
def test_a_wrong_checkpoint_fails_before_the_data_is_read(tmp_path, kind, message):
  """Offline, reading the default CIFAR-100 first meant minutes of tfds retries before this
  error; here the data is a missing folder, whose error must not come first."""
  run = tmp_path / "run"
  path = {"missing": tmp_path / "none", "run_without_epoch": run,
          "run_without_checkpoints": run, "checkpoints_folder": run / "checkpoints",
          "image_folder": tmp_path / "images", "run_file": run / "config.json",
          "inside_a_model": tmp_path / "model" / "state"}[kind]
  checkpoint.save_model(tmp_path / "model", _resnet8(), arch="resnet8", num_classes=100)
  os.makedirs(tmp_path / "images")
  (tmp_path / "images" / "0.jpg").write_bytes(b"\xff\xd8\xff")
  os.makedirs(run)
  (run / "config.json").write_text(cifar_vanilla.get_config().to_json_best_effort())
  if kind != "run_without_checkpoints":
    os.makedirs(run / "checkpoints")  # the trainer makes it before its first epoch ends
  out = run_script("eval.py", "--checkpoint", path,
                   f"--config.data.folder={tmp_path / 'nodata'}", cwd=tmp_path, timeout=120)
  assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
  assert "No split" not in out.stderr and "Traceback" not in out.stderr


def test_an_arch_typo_is_named_as_one_for_a_directory_too(tmp_path):
  """It read 'holds a resnet8, not a resnet_8' for a model directory (a .pth: 'Unknown')."""
  model = str(tmp_path / "model")
  checkpoint.save_model(model, _resnet8(), arch="resnet8", num_classes=100)
  out = run_script("eval.py", "--checkpoint", model, "--arch", "resnet_8", *SYNTHETIC,
                   timeout=120)
  assert out.returncode == 1 and out.stderr.splitlines()[-1].startswith(
      "error: Unknown --arch 'resnet_8' (did you mean 'resnet8'?). Valid names: resnet8, "), (
          out.stderr[-2000:])


def test_a_run_without_its_config_json_needs_a_config(tmp_path):
  """Checkpoints copied without their config.json were evaluated on the default recipe's data
  (offline: minutes of CIFAR-100 download retries, the cause unsaid); now the run is refused
  until --config names its recipe, and is evaluated with it."""
  run = _save_run(tmp_path / "run", [10.0, 20.0])
  os.remove(os.path.join(run, "config.json"))
  for path in (run, os.path.join(run, "checkpoints", "2")):
    out = run_script("eval.py", "--checkpoint", path, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"{run} holds a training run's checkpoints but no config.json" in out.stderr
  out = run_script("eval.py", "--checkpoint", run, *SYNTHETIC, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert _last_json(out)["epoch"] == 2


def test_data_of_another_class_count_is_refused_without_distillation_advice(tmp_path):
  """eval.py's class-count error says to use the model's own data; the advice on training a
  teacher for this data belongs to distillation."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for k in range(2):
    os.makedirs(tmp_path / "data" / "test" / f"class{k}")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
        tmp_path / "data" / "test" / f"class{k}" / "0.png")
  run = _save_run(tmp_path / "run", [10.0])
  out = run_script("eval.py", "--checkpoint", run, "--config", "configs/cifar_vanilla.py",
                   f"--config.data.folder={tmp_path / 'data'}", "--config.data.cache_dir",
                   tmp_path / "cache", timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "has 100 classes but the data has 2; use the data set it was trained on." in out.stderr
  assert "To distill" not in out.stderr


def test_a_bad_config_fails_before_the_model_is_read(tmp_path):
  """A setting no evaluation can use is refused first, not after a model was loaded (here
  a damaged .pth file, whose error must not come first)."""
  (tmp_path / "teacher.pth").write_bytes(b"PK")
  out = run_script("eval.py", "--checkpoint", tmp_path / "teacher.pth", *SYNTHETIC,
                   "--config.eval_batch_size=0", timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "config.eval_batch_size must be a positive integer, got 0" in out.stderr
  assert ".pth" not in out.stderr


def test_a_pth_file_without_torch_installed_is_one_error_line(tmp_path):
  """Every script reports a missing optional package as its other known errors: one line
  saying what to install, no traceback."""
  hidden = tmp_path / "site" / "torch"
  os.makedirs(hidden)
  (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
  (tmp_path / "teacher.pth").write_bytes(b"PK")
  pythonpath = os.pathsep.join(filter(None, [str(tmp_path / "site"),
                                             os.environ.get("PYTHONPATH")]))
  out = run_script("eval.py", "--checkpoint", tmp_path / "teacher.pth", *SYNTHETIC,
                   env={"PYTHONPATH": pythonpath}, timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "error: Reading or writing PyTorch .pth files needs torch: `pip install torch`" in (
      out.stderr)


def test_eval_of_a_run_names_the_epoch_it_evaluates(tmp_path):
  """The best epoch, not the latest: the JSON and the log say which."""
  workdir = _save_run(tmp_path / "run", [30.0, 10.0, 20.0])
  assert checkpoint.latest_saved_epoch(workdir) == 3
  out = run_script("eval.py", "--checkpoint", workdir, *SYNTHETIC)
  assert out.returncode == 0, out.stderr[-2000:]
  result = _last_json(out)
  assert (result["epoch"], result["arch"], result["test_examples"]) == (1, "resnet8", 64)
  assert "Evaluating epoch 1 of the run" in out.stderr and ", its best" in out.stderr
  assert (f"Test top-1 {result['test_top1']:.2f}, top-5 {result['test_top5']:.2f}, loss "
          f"{result['test_loss']:.4f} (64 images of split 'test').") in out.stderr  # for people
  # --config's data is not the run's: said at once, before the data is read.
  assert (f"The run in {workdir} was trained on tfds 'cifar100'; --config evaluates it on "
          "synthetic (random) data (leave --config out") in out.stderr
  # One kept epoch, as mdistiller's epoch_N: that epoch's student (another seed, another loss).
  named = run_script("eval.py", "--checkpoint", os.path.join(workdir, "checkpoints", "3"),
                     *SYNTHETIC)
  assert named.returncode == 0, named.stderr[-2000:]
  assert _last_json(named)["epoch"] == 3 and _last_json(named)["test_loss"] != result["test_loss"]
  assert f"Evaluating epoch 3 of the run in {workdir} (test top-1 20.00" in named.stderr
  gone = run_script("eval.py", "--checkpoint", os.path.join(workdir, "checkpoints", "9"),
                    *SYNTHETIC)
  assert gone.returncode == 1 and gone.stderr.splitlines()[-1].endswith(
      "keeps no checkpoint of epoch 9; it keeps epochs 1, 2, 3."), gone.stderr[-2000:]
  # Without --config, an epoch is evaluated as its run evaluated it: by its config.json.
  config = cifar_vanilla.get_config()
  config.dtype = "bfloat16"
  config.checkpoints_to_keep = 0  # refused for training since, and no business of evaluation
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  as_run = run_script("eval.py", "--checkpoint", os.path.join(workdir, "checkpoints", "3"),
                      *SYNTHETIC[2:])
  assert as_run.returncode == 0, as_run.stderr[-2000:]
  assert (_last_json(as_run)["epoch"], _last_json(as_run)["dtype"]) == (3, "bfloat16")
  assert "--config evaluates it on" not in as_run.stderr
  # A last `=None` lifts a cap, there too: the whole synthetic test split.
  whole = run_script("eval.py", "--checkpoint", os.path.join(workdir, "checkpoints", "3"),
                     *SYNTHETIC[2:], "--config.data.max_test_examples=None",
                     "--config.eval_batch_size=1000", "--config.dtype=float32")
  assert whole.returncode == 0, whole.stderr[-2000:]
  assert _last_json(whole)["test_examples"] == 10_000
  wrong_arch = run_script("eval.py", "--checkpoint", workdir, "--arch", "resnet20", *SYNTHETIC)
  assert wrong_arch.returncode == 1 and "holds a resnet8, not a resnet20" in wrong_arch.stderr
  # The ImageNet recipes normalise otherwise: a CIFAR run is refused there, before any data.
  imagenet = run_script("eval.py", "--checkpoint", workdir, "--config",
                        "configs/imagenet_kd.py:r34_r18,runlocal",
                        f"--config.data.folder={os.path.join(workdir, 'nodata')}")
  assert imagenet.returncode == 1 and "Traceback" not in imagenet.stderr, imagenet.stderr[-2000:]
  assert imagenet.stderr.splitlines()[-1].startswith(
      f"error: The model's run in {workdir} was trained on the 'on_device' pipeline, with "
      "CIFAR's normalisation"), imagenet.stderr[-2000:]
  assert imagenet.stderr.rstrip().endswith(
      "evaluate it with the recipe it was trained with (a run without --config: by its "
      "config.json).")
  # A ported model has no run config.json: warned of the pipeline, not pointed to one.
  ported = str(tmp_path / "ported")
  checkpoint.save_model(ported, _resnet8(), arch="resnet8", num_classes=100)
  imagenet = run_script("eval.py", "--checkpoint", ported, "--config",
                        "configs/imagenet_kd.py:r34_r18,runlocal",
                        f"--config.data.folder={os.path.join(workdir, 'nodata')}")
  assert imagenet.returncode == 1 and "Traceback" not in imagenet.stderr, imagenet.stderr[-2000:]
  assert "unless it was trained so, its logits are off (evaluate it with the recipe it was " \
      "trained with)." in imagenet.stderr, imagenet.stderr[-2000:]


def test_a_relative_data_path_of_an_older_run_is_pointed_out(tmp_path):
  """Runs of versions before 2026-11-29 recorded data paths as typed, relative to where they
  ran; read from elsewhere, a missing (or other) folder needed explaining."""
  workdir = _save_run(tmp_path / "run", [30.0])
  config = cifar_vanilla.get_config()
  config.data.folder = "../data/cifar10_jpeg"
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  os.makedirs(tmp_path / "elsewhere")
  out = run_script("eval.py", "--checkpoint", workdir, cwd=tmp_path / "elsewhere")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert (f"{workdir}/config.json records data.folder as the relative path "
          f"'../data/cifar10_jpeg' (older versions wrote it as given), read from this directory "
          f"as {tmp_path / 'data' / 'cifar10_jpeg'}: if the run's data is elsewhere, pass "
          "--config.data.folder=DIR.") in out.stderr


def test_a_run_config_lacking_fields_is_completed_from_the_default_recipe(tmp_path):
  """A config.json from before a field was added to the recipes, or edited, lacking fields that
  evaluation reads ended in a traceback (AttributeError, KeyError): they are taken from the
  default recipe, and said to be."""
  workdir = _save_run(tmp_path / "run", [30.0])
  recorded = json.loads(cifar_vanilla.get_config().to_json_best_effort())
  del recorded["data"]["pipeline"], recorded["eval_batch_size"], recorded["dtype"]
  recorded["teacher"] = None
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(recorded, f)
  out = run_script("eval.py", "--checkpoint", workdir, *SYNTHETIC[2:])
  assert out.returncode == 0, out.stderr[-2000:]
  assert _last_json(out)["test_examples"] == 64 and _last_json(out)["dtype"] == "float32"
  assert (f"{workdir}/config.json lacks teacher.name, teacher.checkpoint, "
          "teacher.fold_batchnorm, data.pipeline, dtype (an older sortkd-jax wrote it, or it was "
          "edited): taken as configs/cifar_vanilla.py gives them") in out.stderr  # not the
  # eval_batch_size it lacks too: the command line gives that


def test_a_model_with_non_finite_outputs_is_an_error(tmp_path):
  """Its figures are printed (the loss as null), then one error line; NaN logits never count as
  correct."""
  finite, damaged = str(tmp_path / "finite"), str(tmp_path / "damaged")
  checkpoint.save_model(finite, _resnet8(), arch="resnet8", num_classes=100)
  checkpoint.save_model(damaged, _resnet8(nan=True), arch="resnet8", num_classes=100)
  out = run_script("eval.py", "--checkpoint", damaged, *SYNTHETIC)
  assert out.returncode == 1, out.stderr[-2000:]
  result = _last_json(out)
  assert result["test_loss"] is None
  assert result["test_top1"] == result["test_top5"] == 0 and result["epoch"] is None
  error = out.stderr.strip().splitlines()[-1]
  assert error.startswith("error: the model's outputs are not finite") and "Traceback" not in (
      out.stderr)
  ok = run_script("eval.py", "--checkpoint", finite, *SYNTHETIC)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert math.isfinite(_last_json(ok)["test_loss"])


def test_eval_of_a_bfloat16_run_reproduces_its_records(tmp_path):
  """A run is evaluated as it evaluated itself (its config's dtype and batch), exactly;
  `--config.dtype=float32` asks for the float32 figure instead."""
  from helpers import read_metrics
  from sortkd_jax import train
  config = cifar_vanilla.get_config("res56_res20")
  config.student.name = "resnet8"
  config.data.update(name="synthetic", max_train_examples=64, max_test_examples=64)
  config.update(batch_size=32, eval_batch_size=32, num_epochs=1, dtype="bfloat16")
  workdir = str(tmp_path / "bf16")
  train.train_and_evaluate(config, workdir)
  record = [r for r in read_metrics(workdir) if r["kind"] == "epoch"][0]
  out = run_script("eval.py", "--checkpoint", workdir)
  assert out.returncode == 0, out.stderr[-2000:]
  result = _last_json(out)
  assert result["dtype"] == "bfloat16"
  assert (result["test_loss"], result["test_top1"]) == (record["test_loss"], record["test_top1"])
  out = run_script("eval.py", "--checkpoint", workdir, "--config.dtype=float32")
  assert out.returncode == 0, out.stderr[-2000:]
  result = _last_json(out)
  assert result["dtype"] == "float32"
  np.testing.assert_allclose(result["test_loss"], record["test_loss"], rtol=1e-2)


def test_a_tilde_after_an_equals_sign_is_the_home_folder(tmp_path):
  """The shell expands `--checkpoint ~/m` but not `--checkpoint=~/m` nor a quoted
  `--checkpoint '~/m'`: that `~` once named a folder `~` in the working directory (a workdir
  made there, a checkpoint not found)."""
  checkpoint.save_model(str(tmp_path / "model"), _resnet8(), arch="resnet8", num_classes=100)
  os.makedirs(tmp_path / "elsewhere")
  home = {"HOME": str(tmp_path)}
  synthetic = ["--config", os.path.join(REPO, "configs", "cifar_kd.py:res56_res20"),
               *SYNTHETIC[2:]]
  out = run_script("eval.py", "--checkpoint=~/model", *synthetic, env=home,
                   cwd=tmp_path / "elsewhere")
  assert out.returncode == 0, out.stderr[-2000:]
  assert _last_json(out)["checkpoint"] == str(tmp_path / "model")
  # Quoted; and a --config.* override, read as eval.py defines its default recipe: the same.
  out = run_script("eval.py", "--checkpoint", "~/model", "--config.data.folder=~/nodata",
                   env=home, cwd=tmp_path / "elsewhere")
  assert out.returncode == 1 and f"folder {tmp_path / 'nodata'}" in out.stderr, (
      out.stderr[-2000:])
  assert os.listdir(tmp_path / "elsewhere") == []


def test_a_device_out_of_memory_names_the_evaluation_batch(tmp_path):
  """XLA's error, as a GPU gives it when the evaluation batch does not fit (injected here)."""
  model = str(tmp_path / "model")
  checkpoint.save_model(model, _resnet8(), arch="resnet8", num_classes=100)
  driver = (
      "import runpy, sys, jax\n"
      "from sortkd_jax import evaluation\n"
      "def out_of_memory(*args, **kwargs):\n"
      "  def evaluate(*args):\n"
      "    raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to '\n"
      "                                     'allocate 8589934592 bytes.')\n"
      "  return evaluate\n"
      "evaluation.make_evaluator = out_of_memory\n"
      "sys.argv = sys.argv[1:]\n"
      "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  out = run_python("-c", driver, os.path.join(REPO, "scripts", "eval.py"), "--checkpoint", model,
                   *SYNTHETIC)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "error: The device ran out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to "
      "allocate 8589934592 bytes.). The evaluation holds batches of its images: lower "
      "config.eval_batch_size (32). config.dtype='bfloat16' halves the activations.")
