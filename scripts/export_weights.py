"""Writes a sortkd_jax model as a PyTorch file that mdistiller loads: the way back from
scripts/port_weights.py, e.g. to evaluate or deploy a student trained here with PyTorch code.

  python scripts/export_weights.py --checkpoint runs/kd --dst student_best.pth
  python tools/eval.py -m resnet8x4 -c student_best.pth      # in mdistiller

`--checkpoint` is a training workdir (its best epoch, as mdistiller's `student_best`), one kept
epoch of it (`<workdir>/checkpoints/<epoch>`) or a model directory from scripts/port_weights.py.
The file holds `{"model": state_dict}` with mdistiller's keys and layouts, `num_batches_tracked`
included, so a strict `load_state_dict` takes it.
Needs torch (the CPU build is enough).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import flags  # noqa: E402

from sortkd_jax import cli  # noqa: E402

flags.DEFINE_string("checkpoint", None, "Training workdir or model directory to export.")
flags.DEFINE_string("dst", None, "PyTorch file to write (.pth).")
flags.DEFINE_bool("overwrite", False, "Replace --dst if it exists.")
flags.mark_flags_as_required(["checkpoint", "dst"])
FLAGS = flags.FLAGS


def main():
  from sortkd_jax import checkpoint, porting, teachers  # noqa: PLC0415 - keep --help fast

  src, dst = os.path.expanduser(FLAGS.checkpoint), FLAGS.dst  # quoted '~/runs/x' too
  if not os.path.exists(src):
    checkpoint.check_run_epoch_kept(src)
    raise FileNotFoundError(f"--checkpoint {src!r} does not exist.")
  if not os.path.isdir(src):
    raise ValueError(f"--checkpoint {src!r} is a file: give a training workdir or a directory "
                     "from scripts/port_weights.py (a .pth file is PyTorch already).")
  if not dst.strip():
    raise ValueError("--dst is empty: name the file to write, e.g. student_best.pth.")
  dst = os.path.expanduser(dst)  # quoted, '~/m.pth' made a folder named ~
  if os.path.isdir(dst) or dst.endswith((os.sep, "/")):
    raise ValueError(f"--dst {dst!r} names a directory; give the file to write, e.g. "
                     f"{os.path.join(dst, 'student_best.pth')}.")
  target = checkpoint.write_target(dst)  # a symbolic link's target
  folder = os.path.dirname(target)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise NotADirectoryError(f"The folder of --dst {dst!r}, {folder}, is a file: choose another "
                             "path.")
  if os.path.exists(dst):
    if not FLAGS.overwrite:
      raise FileExistsError(f"--dst {dst!r} already exists; pass --overwrite to replace it.")
    source = os.path.realpath(checkpoint.workdir_of(src))
    if os.path.commonpath([source, os.path.realpath(dst)]) == source:
      raise ValueError(f"--dst {dst!r} is a file of {source}, the checkpoint being exported, "
                       "which --overwrite would break; write the .pth elsewhere.")
  model, meta = teachers.load_frozen_model(src)
  arch = meta["arch"]
  notes = _input_notes(src, arch)  # reads the run's config.json: fails before anything is written
  num_tensors = porting.save_torch_file(dst, model)
  num_classes = porting.num_classes_of(model)
  print(f"Exported {src}" + (f" (epoch {meta['epoch']}{', its best' * meta['best']})"
                             if "epoch" in meta else "")
        + f"\n  arch        {arch} ({num_classes} classes)\n"
        f"  tensors     {num_tensors} (num_batches_tracked included)\n"
        f"  written to  {target}\n"
        f"  in PyTorch  mdistiller's {arch}: "
        f"model.load_state_dict(torch.load({dst!r})['model'])" + notes)


def _input_notes(src: str, arch: str) -> str:
  """For a run that fed its model otherwise than mdistiller feeds the architecture:
  * at another image size: most of mdistiller's models end in a fixed-size pool (8x8 for
    CIFAR's ResNets, 7x7 for ImageNet's; spec §2-§3), ours in a global one, which is the same
    at the native size;
  * normalised with the other dataset's statistics (a CIFAR model on an ImageNet recipe, or
    the reverse)."""
  from sortkd_jax import augment, models, workdirs  # noqa: PLC0415

  recorded = workdirs.run_config_of(src)
  if recorded is None:
    return ""  # a ported model: trained by PyTorch code, at its native size
  data = recorded.get("data", {})
  size, native = data.get("image_size"), models.native_image_size(arch)
  notes = ""
  if not (size in (None, native) or arch in ("ResNet18", "ResNet50") or arch.startswith("vgg")):
    # (VGG and CIFAR's ResNet18/50 pool adaptively in mdistiller too.)
    notes += (f"\n  note        trained on {size}x{size} images; mdistiller's {arch} ends in a "
              f"fixed pooling sized for {native}x{native}: for {size}x{size}, replace that last "
              "pool by a global average (nn.AdaptiveAvgPool2d(1)), as this model was trained "
              "with")
  pipeline = data.get("pipeline")
  mdistillers = "tf_data" if native == 224 else "on_device"  # ImageNet's loader, or CIFAR's
  if pipeline in augment.PIPELINE_STATS and pipeline != mdistillers:
    mean, std = augment.PIPELINE_STATS[pipeline]
    dataset = "ImageNet" if pipeline == "tf_data" else "CIFAR-100"
    notes += (f"\n  note        trained on images normalised with {dataset}'s mean {mean} and "
              f"std {std}, not those of mdistiller's loader for {arch}: normalise its inputs "
              "with these")
  return notes


if __name__ == "__main__":
  cli.run(main)
