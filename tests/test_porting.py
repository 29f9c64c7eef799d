"""torch → Flax porting: reference logits of mdistiller's own PyTorch models for all 27
architectures, strict key checks, .pth readers, model checkpoints and the port script.

Fixtures (tests/fixtures/porting/<name>.npz, recipe of /work/shared/fixtures/porting):
weights are regenerated from ``seed`` with ``default_rng(seed).random(shape)`` walking the
keys of ``mdistiller_state_dict_keys.json`` in order (running stats come from the file):
4-D ``(2u−1)·√(6/(in/g·kh·kw))``, 2-D ``(2u−1)·√(3/in)``, BN weight ``0.5+0.5u``, bias
``0.2u−0.1``. Input ``default_rng(seed+1).random((N,S,S,3))·2−1`` (N=4, S=32 for CIFAR;
N=2, S=224 for ImageNet); ``logits`` is PyTorch's eval-mode output.
"""

import functools
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx

from helpers import REPO, run_python, run_script
from sortkd_jax import checkpoint, models, porting, teachers

FIXTURES = os.path.join(REPO, "tests", "fixtures", "porting")
with open(os.path.join(FIXTURES, "mdistiller_state_dict_keys.json")) as _f:
  SPEC_KEYS = json.load(_f)


@functools.cache
def fixture(name):
  """(state_dict of float32 NumPy arrays in JSON order, NHWC input, reference logits)."""
  f = np.load(os.path.join(FIXTURES, f"{name}.npz"))
  seed = int(f["seed"])
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in SPEC_KEYS[name]:
    if key.endswith("num_batches_tracked"):
      sd[key] = np.array(0, np.int64)
      continue
    if key.endswith(("running_mean", "running_var")):
      sd[key] = f[f"bn/{key}"]
      continue
    u = rng.random(shape)
    if len(shape) == 4:
      a = (2 * u - 1) * np.sqrt(6 / (shape[1] * shape[2] * shape[3]))
    elif len(shape) == 2:
      a = (2 * u - 1) * np.sqrt(3 / shape[1])
    elif key.endswith("bias"):
      a = 0.2 * u - 0.1
    else:
      a = 0.5 + 0.5 * u
    sd[key] = a.astype(np.float32)
  n, s = (2, 224) if name.startswith("imagenet_") else (4, 32)
  x = (np.random.default_rng(seed + 1).random((n, s, s, 3)) * 2 - 1).astype(np.float32)
  return sd, x, f["logits"]


def rel_err(out, ref):
  return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_fixture_logits(name):
  sd, x, ref = fixture(name)
  model = porting.port_state_dict(name, sd)
  assert models.count_params(model) == sum(
      v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                       "num_batches_tracked")))
  out = model(jnp.asarray(x))
  assert out.shape == ref.shape and out.dtype == jnp.float32
  assert rel_err(out, ref) < 1e-4
  if name == "resnet8":  # export is the exact inverse
    back = porting.export_state_dict(model)
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
    for k, v in back.items():
      np.testing.assert_array_equal(v, sd[k])


# (name, BatchNorms folded, BatchNorms in all): WRN's pre-activation blocks keep the BN that
# reads the residual sum; wrn_16_1's first block also adds the stem conv's raw output to its
# residual, so the BN after that conv stays too. ShuffleV2 and VGG cover depthwise convs and
# convs with a bias.
FOLDS = [("resnet32x4", 34, 34), ("wrn_16_1", 6, 13), ("vgg8", 5, 5), ("ShuffleV2", 56, 56)]


@pytest.mark.parametrize("name, folded, total", FOLDS)
def test_folded_batchnorms_keep_the_reference_logits(name, folded, total):
  sd, x, ref = fixture(name)
  model = porting.port_state_dict(name, sd)
  count = lambda: sum(isinstance(node, models.BatchNorm) for _, node in nnx.iter_graph(model))
  assert count() == total
  assert models.fold_batchnorm(model, x.shape[1:]) == folded
  assert count() == total - folded
  assert rel_err(model(jnp.asarray(x)), ref) < 1e-4



def test_folding_refuses_a_model_it_cannot_trace_layer_by_layer():
  """Layers run inside a nested program are out of the folding analysis's sight: it must
  refuse, not fold blindly."""

  class NestedBlock(nnx.Module):
    def __init__(self):
      self.block = models.create_model("resnet8", 10, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return jax.jit(lambda x: self.block(x))(x)

  model = NestedBlock()
  before = nnx.state(model)
  with pytest.raises(NotImplementedError, match="fold_batchnorm=False"):
    models.fold_batchnorm(model, (32, 32, 3))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)

def test_a_teacher_that_cannot_be_folded_runs_unfolded(tmp_path, monkeypatch, caplog):
  """Folding reads JAX's traced programs through JAX internals (jax.extend.core), which a JAX
  may move: the run's teacher is then loaded unfolded, with a warning, instead of the run
  failing, and the models package imports all the same."""
  moved = ("import sys, types, jax.extend.core as core\n"
           "moved = types.ModuleType('moved')\n"
           "moved.__dict__.update({k: v for k, v in vars(core).items() if k != 'Literal'})\n"
           "sys.modules['jax.extend.core'] = moved\n")
  done = run_python("-c", moved + "import sortkd_jax.models; print('imported')", timeout=120)
  assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]
  model = models.create_model("resnet8", 10, rngs=nnx.Rngs(0))
  checkpoint.save_model(str(tmp_path / "teacher"), model, arch="resnet8", num_classes=10)
  moved = types.ModuleType("moved")
  moved.__dict__.update({k: v for k, v in vars(jax.extend.core).items() if k != "Literal"})
  monkeypatch.setitem(sys.modules, "jax.extend.core", moved)
  teacher = ml_collections.ConfigDict(dict(name="resnet8", checkpoint=str(tmp_path / "teacher"),
                                           fold_batchnorm=True))
  loaded, _, _ = teachers.load_teacher(teacher, 10, image_size=32)
  assert ("Cannot fold the BatchNorms of the teacher resnet8 into its convolutions (ImportError: "
          in caplog.text and "it runs unfolded" in caplog.text)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  model.eval()
  np.testing.assert_array_equal(loaded(images), model(images))
  assert any(isinstance(m, models.layers.BatchNorm) for _, m in nnx.iter_graph(loaded))


# --------------------------------------------------------------------------------------
# port_state_dict: strictness and conveniences.
# --------------------------------------------------------------------------------------


def test_porting_accepts_prefix_tensors_and_missing_num_batches_tracked():
  sd, x, ref = fixture("resnet8")
  variant = {"module." + k: torch.from_numpy(v.copy()) for k, v in sd.items()
             if not k.endswith("num_batches_tracked")}
  model = porting.port_state_dict("resnet8", variant)
  assert rel_err(model(jnp.asarray(x)), ref) < 1e-4
  assert all(b.use_running_average for _, b in nnx.iter_modules(model)
             if isinstance(b, models.BatchNorm))


def test_porting_error_lists_missing_unexpected_and_mismatched():
  sd, _, _ = fixture("resnet8")
  bad = dict(sd)
  del bad["layer1.0.conv1.weight"], bad["bn1.running_var"]
  bad["layer9.extra.weight"] = np.zeros(3, np.float32)
  bad["conv1.num_batches_tracked"] = np.zeros((), np.int64)  # only a BatchNorm's is skipped
  bad["layer2.0.conv2.weight"] = np.zeros((32, 32, 1, 1), np.float32)
  with pytest.raises(porting.PortingError) as e:
    porting.port_state_dict("resnet8", bad)
  msg = str(e.value)
  assert isinstance(e.value, ValueError)
  assert "2 missing key(s), 2 unexpected key(s), 1 shape mismatch(es)" in msg
  for text in ("layer1.0.conv1.weight", "bn1.running_var", "layer9.extra.weight",
               "layer2.0.conv2.weight: expected (32, 32, 3, 3), got (32, 32, 1, 1)"):
    assert text in msg
  assert e.value.missing == ["bn1.running_var", "layer1.0.conv1.weight"]
  assert sorted(e.value.unexpected) == ["conv1.num_batches_tracked", "layer9.extra.weight"]
  assert e.value.mismatched == [("layer2.0.conv2.weight", (32, 32, 3, 3), (32, 32, 1, 1))]
  assert msg.endswith("Check the architecture name.")
  # A distiller's whole state dict (module.student.*, module.teacher.*) handed in directly.
  distiller = {f"module.{c}.{k}": v for c in ("student", "teacher") for k, v in sd.items()}
  with pytest.raises(porting.PortingError, match=r"distiller's keys \(student\./teacher\.\): "
                     r"port one component"):
    porting.port_state_dict("resnet8", distiller)


def test_wrong_architecture_names_the_right_one():
  sd, _, _ = fixture("resnet14")
  with pytest.raises(porting.PortingError, match=r"match architecture\(s\) \['resnet14'\]"):
    porting.port_state_dict("resnet8", sd)
  with pytest.raises(ValueError, match="Unknown architecture 'resnet9'"):
    porting.port_state_dict("resnet9", sd)


def test_num_classes_inferred_and_checked():
  sd, _, _ = fixture("resnet8")
  sd10 = dict(sd, **{"fc.weight": sd["fc.weight"][:10], "fc.bias": sd["fc.bias"][:10]})
  model = porting.port_state_dict("resnet8", sd10)
  assert model(jnp.zeros((1, 32, 32, 3))).shape == (1, 10)
  with pytest.raises(porting.PortingError, match="has 10 classes but num_classes=100"):
    porting.port_state_dict("resnet8", sd10, num_classes=100)


# --------------------------------------------------------------------------------------
# Reading .pth files.
# --------------------------------------------------------------------------------------


def _torch_sd(sd):
  return {k: torch.tensor(0) if k.endswith("num_batches_tracked") else torch.from_numpy(v.copy())
          for k, v in sd.items()}


@pytest.fixture(scope="module")
def pth_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("pth")
  sd, _, _ = fixture("resnet8")
  tsd = _torch_sd(sd)
  teacher = {"model": tsd, "epoch": 240, "accuracy": torch.tensor(72.34),
             "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                           "param_groups": [{"lr": 0.05, "momentum": 0.9, "dampening": 0,
                                             "weight_decay": 5e-4, "nesterov": False,
                                             "params": [0]}]}}
  other = {k: v * 0 for k, v in tsd.items()}  # a different second model
  latest = {"epoch": 3, "best_acc": 1.0, "optimizer": {},
            "model": {**{f"module.student.{k}": v for k, v in tsd.items()},
                      **{f"module.teacher.{k}": v for k, v in other.items()}}}
  files = {"teacher": d / "ckpt_epoch_240.pth", "latest": d / "latest",
           "student": d / "student_best", "bare": d / "bare.pth"}
  torch.save(teacher, files["teacher"])
  torch.save(latest, files["latest"])
  torch.save({"model": tsd}, files["student"])
  torch.save(tsd, files["bare"], _use_new_zipfile_serialization=False)  # legacy format
  (d / "corrupt.pth").write_bytes(b"definitely not a checkpoint" * 10)
  files["corrupt"] = d / "corrupt.pth"
  return {k: str(v) for k, v in files.items()}


def test_a_directory_is_not_a_checkpoint_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="is a directory; pass the checkpoint file"):
    porting.load_torch_state_dict(str(tmp_path))


def test_pth_teacher_for_data_of_another_class_count(pth_files):
  """A run or eval.py gets its class count from the data: the message says so."""
  with pytest.raises(ValueError, match=(
      r"has 100 classes but the data has 10; use the data set it was trained on\. To distill on "
      r"this data, train a teacher on it first \(scripts/train.py --config "
      r"configs/cifar_vanilla.py:resnet8 with this data")):
    teachers.load_frozen_model(pth_files["teacher"], arch="resnet8", num_classes=10)


@pytest.mark.parametrize("kind", ["teacher", "latest", "student", "bare"])
def test_pth_round_trip(pth_files, kind):
  _, x, ref = fixture("resnet8")
  sd = porting.load_torch_state_dict(pth_files[kind], "student" if kind == "latest" else None)
  assert all(isinstance(v, np.ndarray) for v in sd.values())
  model = porting.port_state_dict("resnet8", sd)
  assert rel_err(model(jnp.asarray(x)), ref) < 1e-4


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1",
                                  "ShuffleV2", "ResNet18"])
def test_saved_torch_file_is_the_ported_state_dict(name, tmp_path):
  """save_torch_file inverts porting exactly: mdistiller's keys (num_batches_tracked too),
  shapes and values, as a student file {"model": state_dict}."""
  sd = fixture(name)[0]
  path = tmp_path / f"{name}.pth"
  assert porting.save_torch_file(path, porting.port_state_dict(name, sd)) == len(sd)
  saved = torch.load(path, weights_only=True)
  assert list(saved) == ["model"] and saved["model"].keys() == sd.keys()
  for key, value in saved["model"].items():
    np.testing.assert_array_equal(value.numpy(), sd[key], err_msg=key)
    assert value.numpy().dtype == sd[key].dtype, key


def test_saving_a_torch_file_leaves_other_files_alone(tmp_path, monkeypatch):
  """The file is written under a name of its own: `<dst>.tmp` may be the user's, and an
  interrupted save leaves neither a temporary file nor a half-written `dst`."""
  model = porting.port_state_dict("resnet8", fixture("resnet8")[0])
  theirs = tmp_path / "student_best.pth.tmp"
  theirs.write_text("my notes")
  dst = tmp_path / "student_best.pth"
  porting.save_torch_file(dst, model)
  assert theirs.read_text() == "my notes"
  assert sorted(os.listdir(tmp_path)) == ["student_best.pth", "student_best.pth.tmp"]
  assert oct(os.stat(dst).st_mode & 0o777) == oct(0o666 & ~_umask())

  def interrupted(obj, f):
    f.write(b"half")
    raise KeyboardInterrupt
  monkeypatch.setattr(torch, "save", interrupted)
  with pytest.raises(KeyboardInterrupt):
    porting.save_torch_file(dst, model)
  assert sorted(os.listdir(tmp_path)) == ["student_best.pth", "student_best.pth.tmp"]
  assert torch.load(dst, weights_only=True)["model"].keys() == fixture("resnet8")[0].keys()


def test_a_full_disk_is_named_as_such_and_keeps_the_file_there(tmp_path, monkeypatch):
  """torch.save's own writer reported a full disk as "[enforce fail at inline_container.cc]
  unexpected pos", naming neither the cause nor the file."""
  model = porting.port_state_dict("resnet8", fixture("resnet8")[0])
  dst = tmp_path / "student.pth"
  porting.save_torch_file(dst, model)
  before = dst.read_bytes()
  monkeypatch.setattr(porting, "open", lambda path, mode: open("/dev/full", mode),
                      raising=False)  # every write fails with ENOSPC
  with pytest.raises(OSError, match=re.escape(
      f"[Errno 28] No space left on device: cannot write {dst}, its filesystem is full; "
      "nothing was written there (what was there is kept). Free space there, then re-run the "
      "same command.")):
    porting.save_torch_file(dst, model)
  assert os.listdir(tmp_path) == ["student.pth"] and dst.read_bytes() == before


def test_a_long_legal_name_is_written_and_a_failure_names_the_path(tmp_path):
  """The temporary name beside `dst` added 14 characters, so a legal 245-character name failed
  (ENAMETOOLONG); errors named the temporary file, not the one asked for."""
  model = porting.port_state_dict("resnet8", fixture("resnet8")[0])
  long_name = tmp_path / ("a" * 245)
  porting.save_torch_file(f"{long_name}.pth", model)
  checkpoint.save_model(str(long_name), model, arch="resnet8", num_classes=100)
  assert sorted(os.listdir(tmp_path)) == [long_name.name, f"{long_name.name}.pth"]
  missing = tmp_path / "gone" / "student.pth"
  with pytest.raises(OSError, match=f"cannot write {missing} in {missing.parent}: No such"):
    checkpoint.temp_beside(str(missing), directory=False)
  porting.save_torch_file(missing, model)  # which makes the folder first, as save_model does
  assert os.listdir(missing.parent) == ["student.pth"]


def test_a_model_directory_on_a_full_disk_is_named_and_the_old_one_kept(tmp_path, monkeypatch):
  """Orbax's error named only the temporary directory, which was gone by then."""
  model = porting.port_state_dict("resnet8", fixture("resnet8")[0])
  dst = tmp_path / "teacher"
  checkpoint.save_model(str(dst), model, arch="resnet8", num_classes=100)

  def disk_full(self, directory, *args, **kwargs):
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database at local '
                     f'file "{directory}/ocdbt.process_0/": No space left on device '
                     "[os_error_code='28']")

  monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save", disk_full)
  with pytest.raises(OSError, match=re.escape(
      f"[Errno 28] No space left on device: cannot write {dst}, its filesystem is full; nothing "
      "was written there (what was there is kept). Free space there, then re-run the same "
      "command.")):
    checkpoint.save_model(str(dst), model, arch="resnet8", num_classes=100, overwrite=True)
  assert os.listdir(tmp_path) == ["teacher"]
  assert checkpoint.load_model(str(dst))[1]["arch"] == "resnet8"


def test_a_model_directory_this_user_cannot_replace_is_named_and_nothing_left(tmp_path,
                                                                           monkeypatch):
  """`--overwrite` of another user's directory (which moves only with write access to it)
  said `[Errno 13] Permission denied: 'dst' -> '.dst.old-x/old'` and left `.dst.old-x/`."""
  model = porting.port_state_dict("resnet8", fixture("resnet8")[0])
  dst = str(tmp_path / "teacher")
  checkpoint.save_model(dst, model, arch="resnet8", num_classes=100)
  rename = os.rename

  def rename_as_another_user(src, target):  # (the tests run as root, who may move it)
    if src == dst:
      raise PermissionError(13, "Permission denied", src, target)
    rename(src, target)

  monkeypatch.setattr(os, "rename", rename_as_another_user)
  with pytest.raises(PermissionError, match=re.escape(
      f"[Errno 13] Permission denied: {dst} cannot be replaced by this user; choose another "
      "destination.")):
    checkpoint.save_model(dst, model, arch="resnet8", num_classes=100, overwrite=True)
  assert os.listdir(tmp_path) == ["teacher"]
  assert checkpoint.load_model(dst)[1]["arch"] == "resnet8"


def test_a_model_directory_gets_the_permissions_the_umask_allows(tmp_path):
  """Always 0755 before: under a group's umask 002 its members could not replace it."""
  model = models.create_model("resnet8", 10, rngs=nnx.Rngs(0))
  was = os.umask(0o002)
  try:
    checkpoint.save_model(str(tmp_path / "shared"), model, arch="resnet8", num_classes=10)
    os.umask(0o077)
    checkpoint.save_model(str(tmp_path / "own"), model, arch="resnet8", num_classes=10)
  finally:
    os.umask(was)
  assert os.stat(tmp_path / "shared").st_mode & 0o777 == 0o775
  assert os.stat(tmp_path / "own").st_mode & 0o777 == 0o700


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_half_precision_tensors_are_ported_as_float32():
  """A bf16 or fp16 checkpoint: NumPy has no bfloat16, so torch's .numpy() would fail on it."""
  sd, x, _ = fixture("resnet8")
  full = porting.port_state_dict("resnet8", sd)
  for dtype in (torch.bfloat16, torch.float16):
    half = {k: torch.as_tensor(v).to(dtype) if v.dtype == np.float32 else torch.as_tensor(v)
            for k, v in sd.items()}
    model = porting.port_state_dict("resnet8", half)
    assert model.fc.kernel[...].dtype == jnp.float32
    assert rel_err(model(jnp.asarray(x)), full(jnp.asarray(x))) < 0.1  # half's rounding


def test_a_trainer_file_holding_only_a_student_is_that_student(tmp_path):
  """mdistiller's vanilla trainer (no teacher) saves module.student.* alone: no --component
  is needed to read it."""
  sd, _, _ = fixture("resnet8")
  path = str(tmp_path / "latest")
  torch.save({"model": {f"module.student.{k}": torch.as_tensor(v) for k, v in sd.items()},
              "epoch": 240}, path)
  loaded = porting.load_torch_state_dict(path)
  assert loaded.keys() == sd.keys()
  np.testing.assert_array_equal(loaded["fc.weight"], sd["fc.weight"])


def test_meta_device_tensors_are_refused_with_advice():
  sd = {k: torch.as_tensor(v) for k, v in fixture("resnet8")[0].items()}
  sd["fc.weight"] = torch.empty(sd["fc.weight"].shape, device="meta")
  with pytest.raises(porting.TorchFileError, match=r"'fc.weight' is a tensor on torch's 'meta' "
                     "device, which holds a shape but no values: save the model again"):
    porting.port_state_dict("resnet8", sd)


def test_pth_component_selection(pth_files):
  t = porting.load_torch_state_dict(pth_files["latest"], "teacher")
  s = porting.load_torch_state_dict(pth_files["latest"], "student")
  assert set(t) == set(s) == set(SPEC_KEYS["resnet8"][i][0] for i in range(56))
  assert not np.any(t["fc.weight"]) and np.any(s["fc.weight"])


@pytest.mark.parametrize("case,expected", [
    ("state_dict entry", None), ("whole module, trusted", None),
    ("module as 'model', trusted", None), ("non-tensor extras", None),
    ("no state dict", "holds no state dict (expected a 'model' entry or a dict of tensors; "
                      "found ['epoch', 'acc'])"),
    ("a tensor", "holds no state dict (expected a 'model' entry or a dict of tensors; found "
                 "Tensor)"),
    ("student only", "is a distiller checkpoint without a 'teacher' component (found "
                     "['student'])"),
    ("extras only", "the state dict is empty")])
def test_the_containers_of_a_state_dict_in_pth_files(tmp_path, case, expected):
  """The shapes trainers save a state dict in: read, or named with what the file holds."""
  from mdistiller_torch import TorchCifarResNet
  model = TorchCifarResNet(8, 10)
  sd = model.state_dict()
  saved, component, trust = {
      "state_dict entry": ({"state_dict": sd, "epoch": 3}, None, False),
      "whole module, trusted": (model, None, True),
      "module as 'model', trusted": ({"model": model}, None, True),
      "non-tensor extras": ({"model": {**sd, "note": "hello", "n": 3}}, None, False),
      "no state dict": ({"epoch": 3, "acc": 0.5}, None, False),
      "a tensor": (torch.zeros(3), None, False),
      "student only": ({"model": {f"module.student.{k}": v for k, v in sd.items()}}, "teacher",
                       False),
      "extras only": ({"model": {"note": "hello"}}, None, False)}[case]
  path = str(tmp_path / "file.pth")
  torch.save(saved, path)
  if expected is not None:
    with pytest.raises(porting.TorchFileError, match=re.escape(f"{path!r}") + ".*"
                       + re.escape(expected)):
      porting.load_torch_state_dict(path, component, trust_pickle=trust)
    return
  read = porting.load_torch_state_dict(path, component, trust_pickle=trust)
  assert read.keys() == sd.keys()
  for key, value in sd.items():
    np.testing.assert_array_equal(read[key], value.numpy())


def test_a_component_of_a_file_holding_one_model_is_refused(pth_files):
  """It would be recorded as the ported model's origin (port_weights.py's metadata)."""
  with pytest.raises(porting.TorchFileError, match="holds one model, not a trainer's student "
                     r"and teacher: leave the component \('teacher', --component\) out"):
    porting.load_torch_state_dict(pth_files["teacher"], "teacher")


def test_a_symbolic_link_dst_is_written_through(pth_files, tmp_path):
  """As `open` writes through a link: the link stays and names the new checkpoint (a dangling
  link failed with 'Not a directory', naming a temporary path; a live one was replaced)."""
  store = tmp_path / "store"
  ported, exported = tmp_path / "teacher", tmp_path / "student.pth"
  ported.symlink_to(store / "r8")  # dangling: store/ does not exist yet
  out = run_script("port_weights.py", "--src", pth_files["teacher"], "--dst", ported)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"written to    {store / 'r8'}" in out.stdout
  assert os.path.islink(ported) and os.path.isfile(store / "r8" / checkpoint.MODEL_JSON)
  exported.symlink_to(store / "s.pth")
  out = run_script("export_weights.py", "--checkpoint", ported, "--dst", exported)
  assert out.returncode == 0, out.stderr[-2000:]
  assert os.path.islink(exported) and sorted(os.listdir(store)) == ["r8", "s.pth"]
  (tmp_path / "up").symlink_to(store / "r8")  # up/.. is store/, as open resolves it
  out = run_script("export_weights.py", "--checkpoint", ported, "--dst",
                   f"{tmp_path / 'up'}/../u.pth")
  assert out.returncode == 0 and f"written to  {store / 'u.pth'}" in out.stdout, out.stderr[-2000:]
  assert os.path.isfile(store / "u.pth") and not os.path.exists(tmp_path / "u.pth")
  assert (torch.load(exported, weights_only=True)["model"].keys()
          == torch.load(pth_files["teacher"], weights_only=True)["model"].keys())
  (tmp_path / "a_file").write_text("")  # a folder that is a file
  out = run_script("export_weights.py", "--checkpoint", ported, "--dst",
                   tmp_path / "a_file" / "s.pth")
  assert out.returncode == 1 and out.stderr.splitlines()[-1] == (
      f"error: The folder of --dst '{tmp_path / 'a_file' / 's.pth'}', {tmp_path / 'a_file'}, is "
      "a file: choose another path."), out.stderr[-2000:]


def test_a_distiller_file_is_loaded_as_one_model_only_with_a_component(pth_files, tmp_path):
  """A teacher or eval.py path must not silently take one half of a student+teacher file."""
  spaced = str(tmp_path / "my runs" / "latest.pth")  # the command it prints quotes the path
  os.makedirs(os.path.dirname(spaced))
  shutil.copy(pth_files["latest"], spaced)
  with pytest.raises(porting.TorchFileError, match=(
      r"holding a student and a teacher: .*\n  python scripts/port_weights.py --src "
      rf"{re.escape(shlex.quote(spaced))} --component teacher --dst DIR\n")):
    teachers.load_frozen_model(spaced, arch="resnet8")
  model, _ = teachers.load_frozen_model(pth_files["latest"], arch="resnet8", component="teacher")
  assert not np.any(model.fc.kernel[...])  # the fixture's teacher has a zero classifier


def test_pth_errors(pth_files, tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    porting.load_torch_state_dict(str(tmp_path / "nope.pth"))
  with pytest.raises(porting.TorchFileError, match="corrupt.pth.*not a readable PyTorch"):
    porting.load_torch_state_dict(pth_files["corrupt"])
  pickled = str(tmp_path / "whole module.pth")  # torch.save(model): needs full unpickling
  torch.save({"model": torch.nn.Linear(2, 3), "epoch": 1}, pickled)
  with pytest.raises(porting.TorchFileError, match=(
      r"\(Unsupported global: GLOBAL torch\.nn\.modules\.linear\.Linear [^)]*\)\. If you trust "
      r"the file, convert it once with `python scripts/port_weights.py --src '.*whole module\.pth' "
      r"--dst DIR --trust_pickle`")) as err:
    porting.load_torch_state_dict(pickled)
  assert "add_safe_globals" not in str(err.value)  # torch's advice for Python code, not ours
  assert set(porting.load_torch_state_dict(pickled, trust_pickle=True)) == {"weight", "bias"}
  # A plain pickle of NumPy arrays: torch.load cannot read it, even with weights_only=False.
  plain = str(tmp_path / "plain.pkl")
  with open(plain, "wb") as f:
    pickle.dump({"weight": np.ones((3, 2), np.float32), "bias": torch.zeros(3)}, f, protocol=2)
  with pytest.raises(porting.TorchFileError, match=(
      r"plain.pkl' is a plain Python pickle, not a torch.save file, .* convert it once with "
      r"`python scripts/port_weights.py --src .*plain\.pkl --dst DIR --trust_pickle`")):
    porting.load_torch_state_dict(plain)
  loaded = porting.load_torch_state_dict(plain, trust_pickle=True)
  np.testing.assert_array_equal(loaded["weight"], np.ones((3, 2)))
  assert set(loaded) == {"weight", "bias"}
  # torch.save with pickle_protocol=4: its weights-only reader refuses the protocol's opcodes.
  protocol4 = str(tmp_path / "protocol4.pth")
  torch.save({"weight": torch.ones(3, 2)}, protocol4, pickle_protocol=4)
  with pytest.raises(porting.TorchFileError, match=r"refuses to unpickle \(Unsupported operand "
                     r"149.*--trust_pickle"):
    porting.load_torch_state_dict(protocol4)
  assert set(porting.load_torch_state_dict(protocol4, trust_pickle=True)) == {"weight"}
  text_pickle = str(tmp_path / "protocol0.pkl")  # protocol 0 has no binary header
  with open(text_pickle, "wb") as f:
    pickle.dump({"weight": np.ones((3, 2), np.float32)}, f, protocol=0)
  with pytest.raises(porting.TorchFileError, match="is a plain Python pickle"):
    porting.load_torch_state_dict(text_pickle)
  assert set(porting.load_torch_state_dict(text_pickle, trust_pickle=True)) == {"weight"}
  legacy = str(tmp_path / "legacy.pth")  # torch.save's pre-1.6 format is a pickle stream too
  torch.save({"weight": torch.ones(3, 2)}, legacy, _use_new_zipfile_serialization=False)
  assert set(porting.load_torch_state_dict(legacy)) == {"weight"}
  with open(legacy, "rb") as f:  # cut inside its header: corrupt, not a plain pickle
    head = f.read(5)
  with open(legacy, "wb") as f:
    f.write(head)
  with pytest.raises(porting.TorchFileError, match="not a readable PyTorch checkpoint"):
    porting.load_torch_state_dict(legacy, trust_pickle=True)
  # A class of the user's own code, not importable where the file is read.
  (tmp_path / "users_net.py").write_text(
      "import torch\nclass Net(torch.nn.Linear):\n  pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  import users_net
  users = str(tmp_path / "users_net.pth")
  torch.save({"model": users_net.Net(2, 3)}, users)
  monkeypatch.delitem(sys.modules, "users_net")
  os.remove(tmp_path / "users_net.py")
  with pytest.raises(porting.TorchFileError, match=(
      r"users_net.pth' pickles a Python class that cannot be imported here \(No module named "
      r"'users_net'\): put the code that saved it on PYTHONPATH")):
    porting.load_torch_state_dict(users, trust_pickle=True)
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match="pip install torch"):
    porting.load_torch_state_dict(pth_files["bare"])


# --------------------------------------------------------------------------------------
# Model checkpoints and the port script.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,message", [
    ("{broken", "is unreadable"), ('{"format": "other"}', "is not a sortkd model description"),
    ("[]", "is not a sortkd model description"), ("null", "is not a sortkd model description")])
def test_a_damaged_model_description_is_named(tmp_path, content, message):
  """JSON that is not an object (`[]`, `null`) raised AttributeError: a traceback in place of
  the scripts' one-line error."""
  dst = tmp_path / "model"
  checkpoint.save_model(str(dst), models.create_model("resnet8", 10, rngs=nnx.Rngs(0)),
                        arch="resnet8", num_classes=10)
  (dst / checkpoint.MODEL_JSON).write_text(content)
  with pytest.raises(ValueError, match=re.escape(f"{dst / checkpoint.MODEL_JSON}'") + ".* "
                     + message):
    checkpoint.load_model(str(dst))


@pytest.mark.usefixtures("python_sigint_handler")
def test_save_load_model(tmp_path, monkeypatch):
  # vgg11: nnx.List containers with gaps (block2.0, .1, .3, .4) must survive orbax.
  sd, x, ref = fixture("vgg11")
  model = porting.port_state_dict("vgg11", sd)
  dst = str(tmp_path / "ckpt")
  info = checkpoint.save_model(dst, model, arch="vgg11", num_classes=100,
                               metadata={"source": "fixture"})
  assert sorted(os.listdir(dst)) == ["sortkd_model.json", "state"]
  assert [p for p in os.listdir(tmp_path) if p != "ckpt"] == []  # no temp leftovers
  loaded, meta = checkpoint.load_model(dst)
  assert meta["arch"] == "vgg11" and meta["num_classes"] == 100
  assert meta["param_count"] == 9_277_284 and meta["metadata"] == {"source": "fixture"}
  assert meta["logits_checksum"] == info["logits_checksum"]
  # The checksum as documented (every saved model's is compared with it on loading).
  probe = (np.random.default_rng(0).random((2, 32, 32, 3)) * 2 - 1).astype(np.float32)
  logits = np.asarray(loaded(jnp.asarray(probe)), np.float64)
  checksum = info["logits_checksum"]
  np.testing.assert_allclose(checksum["first"], logits[0, :5], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(checksum["sum"], logits.sum(), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(checksum["projection"], np.sum(
      logits * np.random.default_rng(1).standard_normal(logits.shape)), rtol=1e-5, atol=1e-4)
  assert os.stat(dst).st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700: may be shared
  assert all(b.use_running_average for _, b in nnx.iter_modules(loaded)
             if isinstance(b, models.BatchNorm))
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(a, b)
  assert rel_err(loaded(jnp.asarray(x)), ref) < 1e-4
  with pytest.raises(FileExistsError, match="overwrite"):
    checkpoint.save_model(dst, model, arch="vgg11", num_classes=100)
  # orbax globs its own path on writing: below `x[1]` it wrote a model it could not read back.
  with pytest.raises(ValueError, match=r"x\[1\]/ckpt' holds brackets, \[...\], which orbax reads "
                     "as a pattern"):
    checkpoint.save_model(tmp_path / "x[1]" / "ckpt", model, arch="vgg11", num_classes=100)
  assert not os.path.exists(tmp_path / "x[1]")
  with pytest.raises(ValueError, match="Unknown arch 'vgg12'. Valid names: resnet8"):
    checkpoint.save_model(dst, model, arch="vgg12", num_classes=100, overwrite=True)
  # An arch or class count the model does not have would write a checkpoint that cannot load.
  with pytest.raises(ValueError, match=r"The weights do not fit a vgg11 with 10 classes: their "
                     r"params/classifier/bias has shape \(100,\), where a vgg11 with 10 classes "
                     r"has \(10,\)"):
    checkpoint.save_model(dst, model, arch="vgg11", num_classes=10, overwrite=True)
  with pytest.raises(ValueError, match=r"The weights do not fit a vgg13 with 100 classes: they "
                     r"have no "):
    checkpoint.save_model(dst, model, arch="vgg13", num_classes=100, overwrite=True)
  with pytest.raises(ValueError, match=r"The weights do not fit a vgg8 with 100 classes, which "
                     r"has no "):
    checkpoint.save_model(dst, model, arch="vgg8", num_classes=100, overwrite=True)
  loaded, _ = checkpoint.load_model(dst)  # the refused saves left the checkpoint as it was
  # Ctrl-C as the new checkpoint is swapped in: the old one is put back, nothing else stays.
  rename = os.rename

  def interrupted_swap(src, dst_):
    if os.path.basename(src).startswith(".ckpt.tmp-"):
      raise KeyboardInterrupt
    rename(src, dst_)
  monkeypatch.setattr(os, "rename", interrupted_swap)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save_model(dst, model, arch="vgg11", num_classes=100, overwrite=True)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
  assert checkpoint.read_model_metadata(dst)["arch"] == "vgg11"
  # Ctrl-C while orbax's thread writes the state: it stops once that thread is done (else the
  # thread wrote on into the removed temporary folder, which could then stay), leaving nothing.
  finalize, finalized = ocp.StandardCheckpointHandler.finalize, []

  def interrupted_finalize(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    finalize(*args, **kwargs)
    finalized.append(True)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "finalize", interrupted_finalize)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save_model(tmp_path / "new", model, arch="vgg11", num_classes=100)
  assert finalized
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
  checkpoint.save_model(dst, model, arch="vgg11", num_classes=100, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
  run = tmp_path / "run"
  os.makedirs(run / checkpoint.TRAIN_CHECKPOINT_DIR)
  with pytest.raises(FileExistsError, match="is a training workdir"):  # never deletes a run
    checkpoint.save_model(str(run), model, arch="vgg11", num_classes=100, overwrite=True)
  assert os.listdir(run) == [checkpoint.TRAIN_CHECKPOINT_DIR]
  with open(os.path.join(dst, "source.pth"), "w") as f:  # e.g. the file it was ported from
    f.write("keep me")
  with pytest.raises(FileExistsError, match=r"holds files besides a model checkpoint \(source"):
    checkpoint.save_model(dst, model, arch="vgg11", num_classes=100, overwrite=True)
  assert open(os.path.join(dst, "source.pth")).read() == "keep me"
  os.remove(os.path.join(dst, "source.pth"))
  with pytest.raises(FileExistsError, match="is a file, not a directory"):
    checkpoint.save_model(os.path.join(dst, checkpoint.MODEL_JSON, "sub"), model, arch="vgg11",
                          num_classes=100)
  bf16, _ = checkpoint.load_model(dst, dtype=jnp.bfloat16)
  assert bf16.classifier.kernel[...].dtype == jnp.float32
  out = bf16(jnp.asarray(x))
  assert out.dtype == jnp.float32 and rel_err(out, ref) < 0.05


def test_load_model_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="port_weights.py"):
    checkpoint.load_model(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a sortkd model checkpoint.*port_weights.py"):
    checkpoint.load_model(str(tmp_path / "empty"))


def test_load_model_refuses_weights_that_do_not_give_the_recorded_logits(tmp_path):
  """Weights that read back without error but compute something else (here another model's,
  swapped in) are refused by the logits recorded at save time."""
  for seed in (0, 1):
    checkpoint.save_model(str(tmp_path / f"m{seed}"), models.create_model(
        "resnet8", 10, rngs=nnx.Rngs(seed)), arch="resnet8", num_classes=10)
  dst = tmp_path / "m0"
  shutil.rmtree(dst / "state")
  shutil.copytree(tmp_path / "m1" / "state", dst / "state")
  with pytest.raises(ValueError, match=r"do not give the logits recorded when they were saved "
                     r"\(sum .*; recorded sum .*\): the checkpoint is damaged"):
    checkpoint.load_model(str(dst))
  # Two classes swapped in the classifier: the same sum (and first five logits), another model.
  swapped = models.create_model("resnet8", 10, rngs=nnx.Rngs(0))
  for param in (swapped.fc.kernel, swapped.fc.bias):
    param[...] = param[...][..., jnp.array([0, 1, 2, 3, 4, 5, 6, 8, 7, 9])]
  info = checkpoint.save_model(str(tmp_path / "swapped"), swapped, arch="resnet8",
                               num_classes=10)
  original = checkpoint.read_model_metadata(str(tmp_path / "m0"))["logits_checksum"]
  np.testing.assert_allclose(info["logits_checksum"]["sum"], original["sum"], rtol=1e-6)
  assert info["logits_checksum"]["first"] == original["first"]
  shutil.rmtree(dst / "state")
  shutil.copytree(tmp_path / "swapped" / "state", dst / "state")
  with pytest.raises(ValueError, match="do not give the logits recorded"):
    checkpoint.load_model(str(dst))
  # A checksum written before the projection existed (perhaps in TF32) is not checked.
  meta = json.loads((dst / checkpoint.MODEL_JSON).read_text())
  del meta["logits_checksum"]["projection"]
  (dst / checkpoint.MODEL_JSON).write_text(json.dumps(meta))
  loaded, _ = checkpoint.load_model(str(dst))
  other, _ = checkpoint.load_model(str(tmp_path / "swapped"))
  for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(other))):
    np.testing.assert_array_equal(a, b)


def port_weights(*args):
  return run_script("port_weights.py", *args)


def test_port_weights_script(pth_files, tmp_path):
  _, x, ref = fixture("resnet8")
  dst = str(tmp_path / "teachers" / "resnet8")
  r = port_weights("--arch", "resnet8", "--src", pth_files["teacher"], "--dst", dst)
  assert r.returncode == 0, r.stderr
  assert "resnet8 (100 classes)" in r.stdout and "83,892" in r.stdout
  assert "47 (+ 9 num_batches_tracked" in r.stdout
  model, meta = checkpoint.load_model(dst)
  assert meta["metadata"]["source"] == pth_files["teacher"]
  assert rel_err(model(jnp.asarray(x)), ref) < 1e-4
  assert f"sum {meta['logits_checksum']['sum']:.6f}" in r.stdout
  assert "warning: its logits are not finite" not in r.stderr

  r = port_weights("--arch", "resnet8", "--src", pth_files["teacher"], "--dst", dst)
  assert r.returncode != 0 and "already exists; pass --overwrite" in r.stderr
  r = port_weights("--src", pth_files["teacher"], "--dst", "")  # not the current directory
  assert r.returncode == 1 and "error: --dst is empty: name the directory" in r.stderr
  # Our own models need no conversion (the error said to pass a .pth file from inside them).
  os.makedirs(tmp_path / "run" / "checkpoints" / "3")
  for ours in (dst, tmp_path / "run", tmp_path / "run" / "checkpoints" / "3"):
    r = port_weights("--src", ours, "--dst", tmp_path / "new")
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == (
        f"error: --src {ours} is a model of this project already (a training run or a ported "
        "model): train.py's --config.teacher.checkpoint and eval.py take it as it is; "
        "export_weights.py makes a PyTorch file of it."), r.stderr[-2000:]
  # A trainer file holds a student and a teacher: neither is taken without --component.
  r = port_weights("--arch", "resnet8", "--src", pth_files["latest"], "--dst", dst,
                   "--overwrite")
  assert r.returncode == 1 and "holding a student and a teacher" in r.stderr, r.stderr
  assert (f"python scripts/port_weights.py --src {pth_files['latest']} --component "
          "teacher --dst DIR\n(or --component student)" in r.stderr)
  assert "Traceback" not in r.stderr
  r = port_weights("--arch", "resnet8", "--src", pth_files["latest"], "--dst", dst,
                   "--component", "teacher", "--overwrite")
  assert r.returncode == 0, r.stderr
  _, meta = checkpoint.load_model(dst)
  assert meta["metadata"]["component"] == "teacher"
  assert meta["logits_checksum"]["sum"] == 0.0  # the all-zero teacher half


@pytest.mark.parametrize("case", ["reshaped", "zero_classes", "epoch_folder", "model_file"])
def test_port_weights_script_mistakes_are_named(pth_files, tmp_path, case):
  """Each refused with what is wrong, nothing written: a tensor of the wrong shape in a file
  whose architecture was found from its keys (not blamed on an --arch never given); a class
  count of 0; a --dst that would pass for an epoch of a run; a ported model's own files."""
  ported = tmp_path / "ported"
  checkpoint.save_model(str(ported), models.create_model("resnet8", 100, rngs=nnx.Rngs(0)),
                        arch="resnet8", num_classes=100)
  reshaped = {k: torch.zeros(16, 3, 5, 5) if k == "conv1.weight" else v
              for k, v in _torch_sd(fixture("resnet8")[0]).items()}
  torch.save({"model": reshaped}, tmp_path / "reshaped.pth")
  dst = tmp_path / "out"
  src, args, expect = {
      "reshaped": (tmp_path / "reshaped.pth", [],
                   "does not fit resnet8 (the architecture whose keys it holds).\n"),
      "zero_classes": (pth_files["teacher"], ["--num_classes", "0"],
                       "error: flag --num_classes=0: 0 is not a positive integer"),
      "epoch_folder": (pth_files["teacher"], [],
                       "would pass for epoch 7 of a training run in " + str(tmp_path / "run")),
      "model_file": (ported / "sortkd_model.json", [],
                     f"is a file of the model directory {ported} (a model of this project")}[case]
  if case == "epoch_folder":
    dst = tmp_path / "run" / "checkpoints" / "7"
  r = port_weights("--src", str(src), "--dst", str(dst), *args)
  assert r.returncode == 1 and expect in r.stderr, r.stderr[-2000:]
  assert "--arch" not in r.stderr and "Traceback" not in r.stderr
  assert not dst.exists()


def test_only_a_model_directory_s_own_files_are_pointed_to_it(pth_files, tmp_path):
  """Its sortkd_model.json and any file under state/ are not PyTorch files; a .pth someone put
  beside them is one."""
  model = tmp_path / "model"
  checkpoint.save_model(str(model), models.create_model("resnet8", 100, rngs=nnx.Rngs(0)),
                        arch="resnet8", num_classes=100)
  deepest = max((os.path.join(d, f) for d, _, files in os.walk(model / "state") for f in files),
                key=lambda p: p.count(os.sep))
  for ours in (model / checkpoint.MODEL_JSON, deepest):
    with pytest.raises(ValueError, match=f"is a file of the model directory {model} "):
      teachers.check_not_a_file_of_ours(str(ours))
  shutil.copy(pth_files["teacher"], model / "extra.pth")
  teachers.check_not_a_file_of_ours(str(model / "extra.pth"))


def test_an_archive_of_checkpoints_is_named_as_one(pth_files, tmp_path):
  """mdistiller's teachers come as cifar_teachers.tar: given whole, it was 'corrupt', as was an
  .npz."""
  import tarfile
  for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
    archive = tmp_path / f"cifar_teachers{suffix}"
    with tarfile.open(archive, mode) as tar:
      tar.add(pth_files["teacher"], "cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth")
    for trust in (False, True):
      with pytest.raises(porting.TorchFileError, match=(
          rf"is a tar archive, not a PyTorch checkpoint: unpack it \(tar -xf {archive}\) and "
          r"pass one of the checkpoint files inside \(it holds 1, e\.g\. "
          r"cifar_teachers/resnet8_vanilla/ckpt_epoch_240\.pth\)\.")):
        porting.load_torch_state_dict(archive, trust_pickle=trust)
  # torch.save's oldest format is a tar too: torch.load reads it, unpickling anything.
  legacy = tmp_path / "old.pth"
  with tarfile.open(legacy, "w") as tar:
    for name in ("sys_info", "pickle", "storages", "tensors"):
      tar.add(pth_files["corrupt"], name)
  with pytest.raises(porting.TorchFileError, match="torch.save's oldest format.*--trust_pickle"):
    porting.load_torch_state_dict(legacy)
  # A zip that torch.save did not write: a NumPy .npz of the state dict (was 'corrupt').
  sd = fixture("resnet8")[0]
  np.savez(tmp_path / "sd.npz", **sd)
  with pytest.raises(porting.TorchFileError, match=(
      r"is a zip archive, not a torch.save file \(it holds conv1.weight.npy, .*\)\. A NumPy "
      r"\.npz of a state dict ports in Python: sortkd_jax\.porting\.port_state_dict\(ARCH, "
      r"dict\(numpy\.load\(path\)\)\)")):
    porting.load_torch_state_dict(tmp_path / "sd.npz")
  ported = porting.port_state_dict("resnet8", dict(np.load(tmp_path / "sd.npz")))
  assert porting.num_classes_of(ported) == 100


def test_every_architecture_has_its_own_keys_so_a_state_dict_names_its_own():
  """What lets port_weights.py and eval.py take a .pth file without --arch."""
  key_sets = {name: frozenset(porting.torch_key_shapes(name)) for name in models.MODEL_NAMES}
  assert len(set(key_sets.values())) == len(key_sets) == 27
  for name, keys in key_sets.items():  # with DataParallel's prefix and BN counters too
    state_dict = {f"module.{k}": np.zeros(1) for k in keys}
    state_dict.update({f"module.{k[:-len('running_mean')]}num_batches_tracked": np.zeros(())
                       for k in keys if k.endswith("running_mean")})
    assert porting.infer_arch(state_dict) == name
  with pytest.raises(porting.PortingError, match=r"No architecture has exactly the 2 keys of "
                     r"this state dict \(first: conv1.weight, fc.weight\): name it with --arch"):
    porting.infer_arch({"conv1.weight": np.zeros(1), "fc.weight": np.zeros(1)})


def test_port_weights_and_eval_find_the_architecture_of_a_pth_file(pth_files, tmp_path):
  _, x, ref = fixture("resnet8")
  dst = str(tmp_path / "resnet8")
  r = port_weights("--src", pth_files["teacher"], "--dst", dst)
  assert r.returncode == 0, r.stderr
  assert "resnet8 (100 classes; found from its keys)" in r.stdout
  assert rel_err(checkpoint.load_model(dst)[0](jnp.asarray(x)), ref) < 1e-4
  out = run_script("eval.py", "--checkpoint", pth_files["latest"], "--component", "teacher",
                   "--config", "configs/cifar_kd.py", "--config.data.name=synthetic",
                   "--config.data.max_test_examples=16", "--config.eval_batch_size=16")
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["arch"] == "resnet8"


def test_port_weights_warns_of_a_model_whose_logits_are_not_finite(tmp_path):
  sd, _, _ = fixture("resnet8")
  diverged = {k: v * float("nan") if k == "fc.weight" else v for k, v in _torch_sd(sd).items()}
  torch.save({"model": diverged}, tmp_path / "diverged.pth")
  r = port_weights("--arch", "resnet8", "--src", str(tmp_path / "diverged.pth"), "--dst",
                   str(tmp_path / "ported"))
  assert r.returncode == 0 and "sum nan" in r.stdout, r.stderr
  assert (f"warning: its logits are not finite: {tmp_path / 'diverged.pth'} holds NaN or "
          "infinite weights" in r.stderr)


def test_a_pth_file_that_does_not_fit_is_named_beside_the_architecture_asked_for(pth_files,
                                                                                tmp_path):
  """A teacher's or eval.py's .pth that did not fit said "Cannot port the state dict into
  'resnet20'" without naming the file, or where resnet20 came from."""
  with pytest.raises(ValueError, match=re.escape(
      f"{pth_files['teacher']} does not fit the requested resnet20 (--config.teacher.name of a "
      "teacher, --arch of eval.py).\nCannot port the state dict into 'resnet20'")):
    teachers.load_frozen_model(pth_files["teacher"], arch="resnet20")
  junk = str(tmp_path / "junk.pth")
  torch.save({"a": torch.zeros(1)}, junk)
  with pytest.raises(ValueError, match=f"^{re.escape(junk)}: No architecture has exactly the 1 "
                                       "keys of this state dict"):
    teachers.load_frozen_model(junk)


def test_eval_script_reads_a_pth_file_as_its_architecture(pth_files):
  """eval.py on a .pth with --arch: the numbers of the ported model on the same images."""
  from sortkd_jax import distributed, evaluation, input_pipeline
  out = run_script("eval.py", "--checkpoint", pth_files["teacher"], "--arch", "resnet8",
                   "--config", "configs/cifar_kd.py", "--config.data.name=synthetic",
                   "--config.data.max_test_examples=16", "--config.eval_batch_size=16")
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  test = input_pipeline.synthetic_split("test")
  model = porting.port_state_dict("resnet8", porting.load_torch_state_dict(pth_files["teacher"]))
  expected = evaluation.make_evaluator(distributed.make_mesh(), test.images[:16],
                                       test.labels[:16], 16)(*evaluation.freeze(model))
  assert (result["arch"], result["test_examples"]) == ("resnet8", 16)
  assert result["test_top1"] == expected["test_top1"]
  np.testing.assert_allclose(result["test_loss"], expected["test_loss"], rtol=1e-5)


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong_arch", "wrong_component_arch",
                                  "wrong_classes", "unknown_arch", "brackets_in_dst"])
def test_port_weights_script_errors(pth_files, tmp_path, case):
  args = {"missing": ("resnet8", str(tmp_path / "nope.pth"), []),
          "corrupt": ("resnet8", pth_files["corrupt"], []),
          "wrong_arch": ("resnet20", pth_files["teacher"], []),
          "wrong_component_arch": ("resnet20", pth_files["latest"], ["--component", "teacher"]),
          "wrong_classes": ("resnet8", pth_files["teacher"], ["--num-classes", "10"]),
          "unknown_arch": ("resnet9", pth_files["teacher"], []),
          "brackets_in_dst": ("resnet8", pth_files["teacher"], [])}[case]
  expect = {"missing": "No such checkpoint file",
            "corrupt": "not a readable PyTorch checkpoint",
            "wrong_arch": "does not fit --arch resnet20",
            "wrong_component_arch": "(In a trainer file, --component teacher takes its "
                                    "teacher; is the resnet20 its student?)",
            "wrong_classes": "has 100 classes but num_classes=10",
            "unknown_arch": "Unknown --arch 'resnet9'. Valid names: resnet8",
            "brackets_in_dst": "out[1]' holds brackets, [...], which orbax reads as a "
                               "pattern"}[case]
  arch, src, extra = args
  dst = tmp_path / ("out[1]" if case == "brackets_in_dst" else "out")
  r = port_weights("--arch", arch, "--src", src, "--dst", str(dst), *extra)
  assert r.returncode == 1
  assert expect in r.stderr
  assert "Traceback" not in r.stderr
  # The trainer-file hint only where a component was taken: a teacher file has none.
  assert ("--component" in r.stderr) == (case == "wrong_component_arch")
  assert not dst.exists()


def test_the_logits_checksum_is_one_program_wherever_the_weights_are():
  """A restored training state is on one device, a training one on all (a mesh), ported weights
  on the host: each placement compiled the checksum's model again (on a resume, twice)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  _, params, stats = nnx.split(models.create_model("resnet8", 7, rngs=nnx.Rngs(0)), nnx.Param,
                               nnx.BatchStat)
  on_host = (nnx.to_pure_dict(params), nnx.to_pure_dict(stats))
  on_one_device = jax.device_put(on_host, jax.devices()[0])
  on_all = jax.device_put(on_host, NamedSharding(Mesh(np.array(jax.devices()), ("data",)),
                                                 PartitionSpec()))
  compiled = checkpoint._eval_logits._cache_size()
  sums = [checkpoint.logits_checksum("resnet8", 7, *weights)
          for weights in (on_host, on_one_device, on_all)]
  assert checkpoint._eval_logits._cache_size() == compiled + 1  # 7 classes: no other test's
  assert sums[0] == sums[1] == sums[2]


def test_a_quoted_tilde_in_a_model_path_is_the_home_folder(pth_files, tmp_path, monkeypatch):
  """The shell leaves a quoted `--src '~/x.pth'` alone, and a config file or flagfile's
  `teacher.checkpoint = '~/teachers/x'` too: each was "does not exist" (the outputs, such as
  `--dst`, took `~` as home already)."""
  monkeypatch.setenv("HOME", str(tmp_path))
  shutil.copy(pth_files["teacher"], tmp_path / "t.pth")
  home = {"HOME": str(tmp_path)}
  out = run_script("port_weights.py", "--src", "~/t.pth", "--dst", "~/ported", env=home)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"Converted {tmp_path / 't.pth'}" in out.stdout
  out = run_script("export_weights.py", "--checkpoint", "~/ported", "--dst", "~/s.pth", env=home)
  assert out.returncode == 0 and os.path.isfile(tmp_path / "s.pth"), out.stderr[-2000:]
  teacher = ml_collections.ConfigDict(dict(name="resnet8", checkpoint="~/ported",
                                           fold_batchnorm=False))
  teachers.check_teacher_exists(teacher)
  model, _, _ = teachers.load_teacher(teacher, 100, image_size=32)
  expected, _ = checkpoint.load_model(str(tmp_path / "ported"))
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(expected))):
    np.testing.assert_array_equal(a, b)
  assert teachers.load_frozen_model("~/t.pth")[1] == {"arch": "resnet8"}
