"""Loading the frozen teacher from whatever the user has: a ported checkpoint, a .pth, or a run.

`config.teacher.checkpoint` may be
  * a directory written by `scripts/port_weights.py` (orbax, with its model metadata),
  * a PyTorch file (mdistiller/RepDistiller teacher, mdistiller trainer file, torchvision file,
    bare state dict), converted on the fly, or
  * the workdir of a run of this project (e.g. `configs/cifar_vanilla.py`): its best
    checkpoint's student becomes the teacher.
A leading `~` is the home folder there too, as written in a config file or a flagfile.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from sortkd_jax import augment, checkpoint, models, reporting, workdirs


# The teachers mdistiller publishes (spec §6): `cifar_teachers.tar` on its GitHub release
# "checkpoints" (RepDistiller's), and torchvision's v1 ImageNet files.
MDISTILLER_CIFAR_TEACHERS = ("resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2",
                             "vgg13")
TORCHVISION_FILES = {"imagenet_ResNet34": "resnet34-333f7ec4.pth",
                     "imagenet_ResNet50": "resnet50-19c8e357.pth"}


def missing_teacher_message(name: str, path: str,
                            data: ml_collections.ConfigDict | None = None) -> str:
  """What to run to get a `name` teacher: the conversion of its published file, or, for an
  architecture mdistiller publishes no teacher of, a run of this project to train one (on
  `data`, the distillation run's, when given)."""
  a_torch_file = path.endswith((".pth", ".pt", ".tar"))  # converted on the fly: a copy to keep
  dst = f"teachers/{name}" if a_torch_file else shlex.quote(path)
  then_pass = f"\nand pass --config.teacher.checkpoint={dst}" if a_torch_file else ""
  if name in TORCHVISION_FILES:
    get = (f"ImageNet teachers are torchvision's v1 files; convert {TORCHVISION_FILES[name]} "
           f"with\n  python scripts/port_weights.py --arch {name} --src "
           f"{TORCHVISION_FILES[name]} --dst {dst}{then_pass}")
  elif name in MDISTILLER_CIFAR_TEACHERS:
    get = ("mdistiller's CIFAR-100 teachers are in `cifar_teachers.tar` on the mdistiller "
           "GitHub release 'checkpoints'; untar it into download_ckpts/ and convert with\n"
           f"  python scripts/port_weights.py --arch {name} --src download_ckpts/"
           f"cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth --dst {dst}{then_pass}")
  else:
    get = (f"mdistiller publishes no {name} teacher; train one with\n  python scripts/train.py "
           f"{_teacher_recipe(name)}{_data_flags(name, data)} --workdir runs/{name}\nand pass "
           f"--config.teacher.checkpoint=runs/{name}")
  return (f"Teacher checkpoint {path!r} for {name} does not exist.\n{get}\n(A PyTorch file "
          "also works as --config.teacher.checkpoint=FILE.pth, converted on the fly.)")


def _teacher_recipe(name: str) -> str:
  """The flags of a plain cross-entropy run training a `name` model, e.g. as a teacher."""
  if name.startswith("imagenet_"):
    return f"--config configs/imagenet_kd.py --config.method=vanilla --config.student.name={name}"
  return f"--config configs/cifar_vanilla.py:{name}"


def _data_flags(name: str, data: ml_collections.ConfigDict | None) -> str:
  """The flags that give a teacher's training run the data of this run, where the teacher's
  recipe would read other data."""
  if data is None:
    return ""
  default = "imagenet2012" if name.startswith("imagenet_") else "cifar100"
  flags = []
  if data.get("folder"):
    flags.append(f"--config.data.folder={data.folder}")
  elif data.get("name") != default:
    flags.append(f"--config.data.name={data.name}")
  if data.get("data_dir"):
    flags.append(f"--config.data.data_dir={data.data_dir}")
  return "".join(f" {shlex.quote(flag)}" for flag in flags)


def load_frozen_model(path: str, *, arch: str | None = None, num_classes: int | None = None,
                      dtype: jnp.dtype = jnp.float32,
                      component: str | None = None) -> tuple[nnx.Module, dict[str, Any]]:
  """A model in eval mode from a ported checkpoint, a PyTorch file or a run's workdir.

  Returns the model and its metadata: its "arch", and for a run the "epoch" used (its best, or
  the one of a `<workdir>/checkpoints/<epoch>` path) and whether it is the run's "best".
  A PyTorch file does not say what it holds: `arch`, or if None the architecture whose keys it
  holds (`porting.infer_arch`); for the others `arch` is checked, and `num_classes` when given.
  `component` picks the student or teacher of an mdistiller trainer file (`latest`, `best`);
  None accepts only a file holding one model.
  """
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    check_not_a_file_of_ours(path)
    from sortkd_jax import porting
    state_dict = porting.load_torch_state_dict(path, component)
    named = f"the requested {arch} (--config.teacher.name of a teacher, --arch of eval.py)"
    if arch is None:
      try:
        arch = porting.infer_arch(state_dict)
      except porting.PortingError as e:
        raise ValueError(f"{path}: {e}") from e
      named = f"{arch} (the architecture whose keys it holds)"
    try:
      model = porting.port_state_dict(arch, state_dict, num_classes=num_classes, dtype=dtype)
    except porting.PortingError as e:
      if e.checkpoint_classes is not None:  # a class-count mismatch: say what to set
        check_num_classes(path, arch, e.checkpoint_classes, num_classes)
        raise
      raise ValueError(f"{path} does not fit {named}.\n{e}") from e
    return model, {"arch": arch}
  in_run = checkpoint.run_epoch_folder(path)
  if in_run is not None:  # one kept epoch of a run
    workdir, epoch = in_run
    model, meta = checkpoint.load_student_from_workdir(workdir, epoch=epoch, dtype=dtype)
  elif os.path.isfile(os.path.join(path, checkpoint.MODEL_JSON)):  # a model, wherever it is
    model, meta = checkpoint.load_model(path, dtype=dtype)
  else:
    _check_not_inside_a_run(path)
    if checkpoint.is_train_workdir(path):
      model, meta = checkpoint.load_student_from_workdir(path, dtype=dtype)
    else:
      model, meta = checkpoint.load_model(path, dtype=dtype)  # says what it is not
  if arch is not None and meta["arch"] != arch:
    raise ValueError(f"{path} holds a {meta['arch']}, not a {arch}; point to a {arch} "
                     f"checkpoint or name {meta['arch']} as the architecture "
                     "(--config.teacher.name of a teacher, --arch of eval.py).")
  check_num_classes(path, meta["arch"], meta["num_classes"], num_classes)
  return model, meta


def check_num_classes(path: str, arch: str, model_classes: int, data_classes: int | None, *,
                      distilling: bool = True) -> None:
  """A model is evaluated or distilled only on data with its classes; a teacher's message also
  says how to get one for this data."""
  if data_classes is not None and model_classes != data_classes:
    message = (f"The model in {path} has {model_classes} classes but the data has "
               f"{data_classes}; use the data set it was trained on.")
    if distilling:
      message += (f" To distill on this data, train a teacher on it first (scripts/train.py "
                  f"{_teacher_recipe(arch)} with this data and a --workdir, then pass that "
                  "workdir as --config.teacher.checkpoint).")
    raise ValueError(message)


def check_not_a_file_of_ours(path: str) -> None:
  """A run's own files (its config.json, say) and a model directory's are not PyTorch files to
  convert: points to the run or the model directory."""
  workdir = os.path.dirname(path) or os.curdir
  if (os.path.basename(path) in (workdirs.CONFIG_FILE, reporting.METRICS_FILE, workdirs.LOCK_FILE)
      and checkpoint.is_train_workdir(workdir)):
    raise ValueError(f"{path} is a file of the training run in {workdir}: pass the workdir "
                     "itself (its best epoch is used) or one kept epoch, "
                     f"{os.path.join(workdir, checkpoint.TRAIN_CHECKPOINT_DIR, '<epoch>')}.")
  real = os.path.abspath(path)
  model_dir = os.path.dirname(real)
  while True:  # <model_dir>/sortkd_model.json, or any file under <model_dir>/state/
    first = os.path.relpath(real, model_dir).split(os.sep)[0]
    if (first in (checkpoint.MODEL_JSON, checkpoint.MODEL_STATE_DIR)
        and os.path.isfile(os.path.join(model_dir, checkpoint.MODEL_JSON))):
      raise ValueError(f"{path} is a file of the model directory {model_dir} (a model of this "
                       "project, e.g. from port_weights.py): pass that directory itself to "
                       "train.py's --config.teacher.checkpoint, eval.py or export_weights.py.")
    if os.path.dirname(model_dir) == model_dir:
      return
    model_dir = os.path.dirname(model_dir)


def _check_not_inside_a_run(path: str) -> None:
  """Points to the workdir when given a run's checkpoint folders or a run without any."""
  path = os.path.normpath(path)
  parts = path.split(os.sep)
  for i, part in enumerate(parts):  # <workdir>/checkpoints, or a path inside an epoch of it
    below = parts[i + 1:]
    workdir = os.sep.join(parts[:i]) or os.curdir
    if part == checkpoint.TRAIN_CHECKPOINT_DIR and (not below or below[0].isdigit()):
      raise ValueError(f"{path} is inside the training run {workdir}: pass the workdir itself "
                       f"(its best epoch is used) or one kept epoch, "
                       f"{os.path.join(workdir, part, '<epoch>')}.")
  # A run stopped at start-up has only its lock.
  run_files = (workdirs.CONFIG_FILE, workdirs.LOCK_FILE)
  if (any(os.path.isfile(os.path.join(path, f)) for f in run_files)
      and checkpoint.latest_saved_epoch(path) is None):
    raise FileNotFoundError(f"The training run in {path} has no checkpoint yet: no epoch "
                            "finished.")


def _report_teacher_run(path: str, meta: dict[str, Any]) -> None:
  """Logs which epoch of a run the teacher is, and warns while that run is unfinished: training
  on, it may change its best epoch or delete this one, and a run distilled from it could then
  not resume."""
  workdir = checkpoint.workdir_of(path)
  epoch = meta["epoch"]
  logging.info("Teacher: the student of epoch %d of the run in %s%s (test top-1 %.2f).",
               epoch, workdir, ", its best" if meta["best"] else "", meta["test_top1"])
  saved_config = os.path.join(workdir, workdirs.CONFIG_FILE)
  if not os.path.isfile(saved_config):
    return
  try:
    planned = workdirs.read_run_config(workdir).get("num_epochs")
  except ValueError as err:  # only for a warning: the teacher's weights are sound
    logging.warning("%s", err)
    return
  finished = checkpoint.latest_saved_epoch(workdir)
  if isinstance(planned, int) and finished < planned:
    change = (f"it deletes epoch {epoch} once that is neither among its latest nor its best"
              if checkpoint.run_epoch_folder(path) else "its best epoch may change")
    logging.warning(
        "The teacher's run in %s has finished %d of its %d epochs; training on, %s, and this "
        "run could then not resume with it. Let it finish first, or freeze this teacher as a "
        "file: python scripts/export_weights.py --checkpoint %s --dst teacher.pth, then "
        "--config.teacher.checkpoint=teacher.pth.", workdir, finished, planned, change,
        os.path.join(workdir, checkpoint.TRAIN_CHECKPOINT_DIR, str(epoch)))


def check_teacher_exists(teacher: ml_collections.ConfigDict,
                         data: ml_collections.ConfigDict | None = None) -> None:
  """Fails before any data is read if the teacher checkpoint is missing, or, given the run's
  `data`, is a run of this project that fed its images otherwise (`check_same_inputs`)."""
  path = os.path.expanduser(teacher.checkpoint or "")
  if not path or not os.path.exists(path):
    checkpoint.check_run_epoch_kept(path)
    raise FileNotFoundError(missing_teacher_message(teacher.name, teacher.checkpoint, data))
  if data is not None:
    check_same_inputs(path, data, arch=teacher.name, role="teacher",
                      fix="distill from a teacher trained with this run's recipe")


# How each pipeline normalises (augment.PIPELINE_STATS): a model learns it with its weights.
_PIPELINE_INPUTS = {"on_device": "CIFAR's normalisation", "tf_data": "ImageNet's normalisation"}
assert _PIPELINE_INPUTS.keys() == augment.PIPELINE_STATS.keys()


def check_same_inputs(path: str, data: ml_collections.ConfigDict, *, arch: str | None = None,
                      role: str, fix: str) -> None:
  """A model from a run of this project (`path`: its workdir or one kept epoch) is refused on
  the other pipeline, whose normalisation it never saw (its logits would be silently off), and
  warned about at another image size. Other models (ported, PyTorch files) record no pipeline:
  an `arch` fed otherwise than mdistiller and torchvision train it is warned about."""
  try:
    recorded = workdirs.run_config_of(path)
  except ValueError:  # a check only: the weights are sound (a run's teacher warns of it)
    return
  if recorded is None:
    usual = "tf_data" if arch and models.native_image_size(arch) == 224 else "on_device"
    if arch and data.get("pipeline") in _PIPELINE_INPUTS and data.pipeline != usual:
      logging.warning(
          "The %s %s, a %s, records no normalisation; mdistiller and torchvision train one with "
          "%s, and it is fed the %r pipeline's images, with %s: unless it was trained so, its "
          "logits are off (%s).", role, path, arch, _PIPELINE_INPUTS[usual], data.pipeline,
          _PIPELINE_INPUTS[data.pipeline], fix)
    return
  workdir, trained = checkpoint.workdir_of(path), recorded.get("data", {})
  was, now = trained.get("pipeline"), data.get("pipeline")
  if was in _PIPELINE_INPUTS and now in _PIPELINE_INPUTS and was != now:
    raise ValueError(
        f"The {role}'s run in {workdir} was trained on the {was!r} pipeline, with "
        f"{_PIPELINE_INPUTS[was]}; it would be fed the {now!r} pipeline's images, with "
        f"{_PIPELINE_INPUTS[now]}, which it never saw: {fix}.")
  was, now = trained.get("image_size"), data.get("image_size")
  if isinstance(was, int) and was != now:
    logging.warning("The %s's run in %s was trained on %d-px images; it is fed %s-px images "
                    "here, so its accuracy may differ from that run's.", role, workdir, was, now)


def load_teacher(teacher: ml_collections.ConfigDict, num_classes: int, *, image_size: int,
                 dtype: jnp.dtype = jnp.float32) -> tuple[nnx.Module, dict[str, Any], int | None]:
  """The frozen teacher of a run: `teacher.name` loaded from `teacher.checkpoint`, its
  BatchNorms folded into the convolutions if `teacher.fold_batchnorm`; its
  `checkpoint.logits_checksum` (of the weights as loaded), by which a resumed run knows its
  teacher wherever its file now is; and, for a run of this project, the epoch of it used."""
  check_teacher_exists(teacher)
  path = os.path.expanduser(teacher.checkpoint)
  model, meta = load_frozen_model(path, arch=teacher.name, num_classes=num_classes, dtype=dtype)
  if "epoch" in meta:
    _report_teacher_run(path, meta)
  checksum = meta.get("logits_checksum")  # a checkpoint's, checked as it was loaded
  if not checkpoint.verifiable(checksum):
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    checksum = checkpoint.logits_checksum(teacher.name, num_classes, nnx.to_pure_dict(params),
                                          nnx.to_pure_dict(stats))
  if teacher.get("fold_batchnorm"):
    _fold_if_possible(model, teacher.name, image_size)
  return model, checksum, meta.get("epoch")


def _fold_if_possible(model: nnx.Module, name: str, image_size: int) -> None:
  """Folding is a speed-up only (the logits change by rounding), read from JAX's traced
  programs: where it fails (a model traced in nested programs, or a JAX whose internals it
  reads have moved) the teacher runs unfolded, said so, rather than not at all."""
  try:
    models.fold_batchnorm(model, (image_size, image_size, 3))
  except Exception as e:  # noqa: BLE001 - the model is unchanged: see fold_batchnorm
    logging.warning("Cannot fold the BatchNorms of the teacher %s into its convolutions (%s: "
                    "%s); it runs unfolded, with the same logits but for rounding, slower on "
                    "GPUs (config.teacher.fold_batchnorm=False skips the attempt).", name,
                    type(e).__name__, e)
