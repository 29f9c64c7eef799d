r"""Converts PyTorch (mdistiller / RepDistiller / torchvision) weights to a sortkd_jax model
checkpoint (an orbax directory readable by `sortkd_jax.checkpoint.load_model`).

mdistiller's CIFAR-100 teachers: download `cifar_teachers.tar` from the mdistiller GitHub
release "checkpoints", untar it into `download_ckpts/`, then e.g.

  python scripts/port_weights.py --arch resnet32x4 \
      --src download_ckpts/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth \
      --dst teachers/resnet32x4

(likewise resnet56, resnet110, ResNet50, wrn_40_2, vgg13: `<name>_vanilla/ckpt_epoch_240.pth`).
Without `--arch` the architecture is found from the file's keys (each of the 27 has its own).
ImageNet teachers are torchvision's v1 files, e.g.

  python scripts/port_weights.py --arch imagenet_ResNet34 --src resnet34-333f7ec4.pth \
      --dst teachers/imagenet_ResNet34

An mdistiller trainer file (`latest`, `best`, `epoch_N`) holds student and teacher; choose
one with `--component student|teacher`.
Needs torch (the CPU build is enough) only to read the .pth file.
"""

import math
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import flags  # noqa: E402

from sortkd_jax import cli  # noqa: E402

flags.DEFINE_string("arch", None, "Architecture, e.g. resnet32x4, wrn_40_2, imagenet_ResNet34; "
                    "default: the one whose keys the file holds (finding it takes seconds).")
flags.DEFINE_string("src", None, "PyTorch checkpoint file (.pth).")
flags.DEFINE_string("dst", None, "Output directory (orbax checkpoint + sortkd_model.json).")
flags.DEFINE_integer("num_classes", None,
                     "Classifier width; default: read from the checkpoint.", lower_bound=1)
flags.DEFINE_enum("component", None, ["student", "teacher"],
                  "Which model of an mdistiller trainer file (module.student./module.teacher. "
                  "keys) to convert; a file holding both is refused without it, a file "
                  "holding one model with it.")
flags.DEFINE_bool("overwrite", False, "Replace --dst if it exists.")
flags.DEFINE_bool("trust_pickle", False,
                  "Allow torch.load(weights_only=False) for files holding pickled Python "
                  "objects. Executes code from the file: trusted files only.")
flags.mark_flags_as_required(["src", "dst"])
FLAGS = flags.FLAGS


def main():
  from sortkd_jax import checkpoint, models, porting, teachers  # noqa: PLC0415 - keep --help fast

  arch, src, dst = FLAGS.arch, os.path.expanduser(FLAGS.src), FLAGS.dst  # quoted '~/x.pth' too
  # Checked before the (possibly large) file is read.
  if arch is not None:
    models.check_name(arch, "--arch")
  if not dst.strip():
    raise ValueError("--dst is empty: name the directory to write, e.g. teachers/resnet32x4.")
  dst = os.path.expanduser(dst)  # quoted, '~/teachers/x' made a folder named ~
  folder, name = os.path.split(checkpoint.write_target(dst))
  if os.path.basename(folder) == checkpoint.TRAIN_CHECKPOINT_DIR and name.isdigit():
    raise ValueError(f"--dst {dst!r} would pass for epoch {name} of a training run in "
                     f"{os.path.dirname(folder)}, which could then not resume; choose another "
                     "directory.")
  unwritable = checkpoint.unwritable_checkpoint_place(checkpoint.write_target(dst))
  if unwritable:
    raise ValueError(f"--dst {dst!r} {unwritable}; choose another directory.")
  if os.path.exists(dst) and not FLAGS.overwrite:
    raise FileExistsError(f"--dst {dst!r} already exists; pass --overwrite to replace it, or "
                          "choose another directory.")
  if os.path.isdir(src) and (checkpoint.is_train_workdir(checkpoint.workdir_of(src))
                             or os.path.isfile(os.path.join(src, checkpoint.MODEL_JSON))):
    raise ValueError(f"--src {src} is a model of this project already (a training run or a "
                     "ported model): train.py's --config.teacher.checkpoint and eval.py take it "
                     "as it is; export_weights.py makes a PyTorch file of it.")
  if os.path.isfile(src):
    teachers.check_not_a_file_of_ours(src)
  state_dict = porting.load_torch_state_dict(src, FLAGS.component,
                                             trust_pickle=FLAGS.trust_pickle)
  found = arch is None
  if found:
    arch = porting.infer_arch(state_dict)
  try:
    model = porting.port_state_dict(arch, state_dict, FLAGS.num_classes)
  except porting.PortingError as e:
    if e.checkpoint_classes is not None:  # only the class count differs
      raise
    other = {"student": "teacher", "teacher": "student"}.get(FLAGS.component)
    named = f"{arch} (the architecture whose keys it holds)" if found else f"--arch {arch}"
    raise ValueError(
        f"{src!r} does not fit {named}.\n{e}" + (
            f"\n  (In a trainer file, --component {FLAGS.component} takes its {FLAGS.component}; "
            f"is the {arch} its {other}?)" if other else "")) from e

  num_classes = porting.num_classes_of(model)
  info = checkpoint.save_model(
      dst, model, arch=arch, num_classes=num_classes, overwrite=FLAGS.overwrite,
      metadata={"source": os.path.abspath(src), "component": FLAGS.component,
                "converted_by": "scripts/port_weights.py"})
  n_tensors = len([k for k in state_dict if not k.endswith("num_batches_tracked")])
  first = ", ".join(f"{v:.6f}" for v in info["logits_checksum"]["first"])
  print(f"Converted {src}\n"
        f"  arch          {arch} ({num_classes} classes{'; found from its keys' * found})\n"
        f"  tensors       {n_tensors} (+ {len(state_dict) - n_tensors} num_batches_tracked, "
        "ignored)\n"
        f"  parameters    {info['param_count']:,}\n"
        f"  logits check  sum {info['logits_checksum']['sum']:.6f}; first [{first}]\n"
        f"                ({info['logits_checksum']['input']})\n"
        f"  written to    {checkpoint.write_target(dst)}")
  checksum = info["logits_checksum"]
  if not all(math.isfinite(v) for v in (checksum["sum"], *checksum["first"])):
    print(f"warning: its logits are not finite: {src} holds NaN or infinite weights (a run that "
          "diverged?); train.py and eval.py will refuse this model.", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
