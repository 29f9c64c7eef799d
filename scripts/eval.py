"""Evaluates a student or teacher checkpoint on a test split: loss, top-1, top-5.

  python scripts/eval.py --checkpoint runs/kd
  python scripts/eval.py --checkpoint runs/kd/checkpoints/240
  python scripts/eval.py --checkpoint teachers/resnet32x4 --config configs/cifar_kd.py
  python scripts/eval.py --checkpoint ckpt_epoch_240.pth --config configs/cifar_kd.py
  python scripts/eval.py --checkpoint teachers/imagenet_ResNet34 --config configs/imagenet_kd.py
  (a CPU trial: --config.data.max_test_examples=N, as the whole split at 224 px takes long)

`--checkpoint` is one of:
- a training workdir (its best epoch), or one kept epoch of it (`<workdir>/checkpoints/<epoch>`,
  as mdistiller's `epoch_N`);
- a directory from scripts/port_weights.py;
- a PyTorch file: its architecture is found from its keys, or named by `--arch`; `--component`
  picks the model of an mdistiller trainer file that holds a student and a teacher.

The config only supplies the data and its pipeline (CIFAR on the device, ImageNet streamed:
`--config.data.folder=DIR`, `--config.data.data_dir=DIR`, ...), the evaluation batch size and
the compute dtype.
- A training workdir without `--config` is evaluated as its run evaluated it, by its
  config.json (data, batch, dtype: a bf16 run's figures come out exactly, to rounding for runs
  made before the classifier computed in float32, 2026-11-30), with the `--config.*` overrides
  applied (e.g. `--config.dtype=float32`). Those are checked against the default recipe
  (cifar_vanilla.py) first, so an ImageNet-only field (`data.manual_dir`,
  `data.shuffle_buffer`) needs the run's recipe as `--config`.
- A run copied without its config.json is refused until `--config` names its recipe.
- With `--config`, a run is evaluated on that config's data: a warning names both when they
  differ, and a run trained on the other pipeline (CIFAR's normalisation, or ImageNet's) is
  refused.

Logs the test top-1, top-5 and loss, and prints one JSON line for scripts: checkpoint, arch, epoch
(of a training workdir: its best, the latest among ties, or the one named; else null), split,
dtype, test loss, top-1, top-5 and the number of examples counted. The checkpoint is read before
the data, so a wrong path fails at once. A non-finite test loss (damaged or diverged weights) is
printed as null, then reported as an error (exit status 1).
"""

import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import flags, logging  # noqa: E402

from sortkd_jax import cli  # noqa: E402

DEFAULT_RECIPE = "configs/cifar_vanilla.py"
cli.define_config_flag(os.path.join(REPO, DEFAULT_RECIPE),
                       "Recipe whose data section names the test split.")
flags.DEFINE_string("checkpoint", None, "Workdir, ported checkpoint directory or .pth file.")
flags.DEFINE_string("arch", None, "Architecture of a .pth file (default: the one whose keys "
                    "it holds, found in seconds); of another checkpoint, checked.")
flags.DEFINE_enum("component", None, ["student", "teacher"],
                  "Which model of an mdistiller trainer file (latest, best, epoch_N) that holds "
                  "a student and a teacher.")
flags.mark_flag_as_required("checkpoint")
FLAGS = flags.FLAGS


def main():
  from sortkd_jax import (checkpoint, distributed, evaluation, models, porting, reporting,
                          teachers, train)

  FLAGS.checkpoint = os.path.expanduser(FLAGS.checkpoint)  # quoted '~/runs/x' too
  if FLAGS.arch is not None:  # a typo is named as one, whatever the checkpoint
    models.check_name(FLAGS.arch, "--arch")
  if not os.path.exists(FLAGS.checkpoint):
    checkpoint.check_run_epoch_kept(FLAGS.checkpoint)
    raise FileNotFoundError(f"checkpoint {FLAGS.checkpoint!r} does not exist.")
  if FLAGS.component and not os.path.isfile(FLAGS.checkpoint):
    raise ValueError(f"--component picks a model of a PyTorch trainer file; {FLAGS.checkpoint} "
                     "is a directory, which holds one model (a run's student, a ported "
                     "model): leave --component out.")
  config = _config()
  train.check_config(config, training=False)
  _warn_of_other_data(config)
  dtype = train.compute_dtype(config)
  # The model before the data: a wrong path fails in seconds, not after the data is read.
  model, meta = teachers.load_frozen_model(FLAGS.checkpoint, arch=FLAGS.arch,
                                           component=FLAGS.component, dtype=dtype)
  epoch = meta.get("epoch")  # a run's, so that the figures trace to a checkpoint
  teachers.check_same_inputs(FLAGS.checkpoint, config.data, arch=meta["arch"], role="model",
                             fix="evaluate it with the recipe it was trained with" + (
                                 " (a run without --config: by its config.json)"
                                 if epoch is not None else ""))
  if epoch is not None:
    logging.info("Evaluating epoch %d of the run in %s%s (test top-1 %.2f when saved).",
                 epoch, checkpoint.workdir_of(FLAGS.checkpoint),
                 ", its best" if meta["best"] else "", meta["test_top1"])
  mesh = distributed.make_mesh()
  evaluate, num_classes = evaluation.make_test_evaluator(config, mesh, dtype=dtype)
  teachers.check_num_classes(FLAGS.checkpoint, meta["arch"], porting.num_classes_of(model),
                             num_classes, distilling=False)
  network, variables = evaluation.freeze(model)
  with train.out_of_memory_explained(config, training=False):
    metrics = evaluate(network, distributed.replicate(variables, mesh))
  logging.info("Test top-1 %.2f, top-5 %.2f, loss %.4f (%s images of split %r).",
               metrics["test_top1"], metrics["test_top5"], metrics["test_loss"],
               f"{metrics['test_examples']:,}", config.data.test_split)
  print(reporting.json_line({"checkpoint": FLAGS.checkpoint, "arch": meta["arch"],
                            "epoch": epoch, "split": config.data.test_split,
                            "dtype": config.dtype, **metrics}), flush=True)
  if not math.isfinite(metrics["test_loss"]):
    raise RuntimeError(f"the model's outputs are not finite (test loss {metrics['test_loss']}): "
                       "its weights are damaged or its training diverged.")


def _config():
  """--config; for a training workdir given without it, the run's own config.json (so its data
  and pipeline), with the command line's --config.* overrides applied. A run whose config.json
  is gone needs --config: the default recipe's data may not be the run's."""
  import ml_collections
  from sortkd_jax import checkpoint, workdirs

  if FLAGS["config"].present:
    return FLAGS.config
  recorded = workdirs.run_config_of(FLAGS.checkpoint)
  if recorded is None:
    workdir = checkpoint.workdir_of(FLAGS.checkpoint)
    if checkpoint.is_train_workdir(workdir):
      raise ValueError(f"{workdir} holds a training run's checkpoints but no "
                       f"{workdirs.CONFIG_FILE}, which says what data the run used: pass the "
                       "run's recipe as --config (with its --config.* flags), or put its "
                       "config.json back beside checkpoints/.")
    return FLAGS.config
  overrides = FLAGS["config"].override_values
  recorded, added = workdirs.with_missing_fields(recorded, FLAGS.config)
  added = [k for k in added if k not in overrides]
  if added:
    logging.warning(
        "%s lacks %s (an older sortkd-jax wrote it, or it was edited): taken as %s gives them; "
        "if the run's differ, pass them as --config.FIELD=VALUE.",
        os.path.join(checkpoint.workdir_of(FLAGS.checkpoint), workdirs.CONFIG_FILE),
        ", ".join(added), DEFAULT_RECIPE)
  config = ml_collections.ConfigDict(recorded)
  config.update_from_flattened_dict(overrides)
  cli.apply_none_overrides(config, recipe=FLAGS.config)
  for field in ("folder", "data_dir"):  # versions before 2026-11-29 kept them as typed
    path = recorded.get("data", {}).get(field)
    if (path and "://" not in path and not os.path.isabs(os.path.expanduser(path))
        and f"data.{field}" not in overrides):
      logging.warning(
          "%s records data.%s as the relative path %r (older versions wrote it as given), read "
          "from this directory as %s: if the run's data is elsewhere, pass "
          "--config.data.%s=DIR.", os.path.join(checkpoint.workdir_of(FLAGS.checkpoint),
                                                workdirs.CONFIG_FILE),
          field, path, os.path.abspath(os.path.expanduser(path)), field)
  return config


def _warn_of_other_data(config) -> None:
  """A run given with --config is evaluated on that config's data, which may not be the run's
  (offline, a default CIFAR-100 was minutes of download retries before any error)."""
  from sortkd_jax import checkpoint, workdirs

  if not FLAGS["config"].present:
    return
  try:
    recorded = workdirs.run_config_of(FLAGS.checkpoint)
  except ValueError:
    return
  if recorded is None:
    return
  trained, workdir = recorded.get("data", {}), checkpoint.workdir_of(FLAGS.checkpoint)
  if _data_source(trained) != _data_source(config.data):
    logging.warning("The run in %s was trained on %s; --config evaluates it on %s (leave --config "
                    "out to evaluate it on its run's data).", workdir, _data_source(trained),
                    _data_source(config.data))


def _data_source(data) -> str:
  """Where a config's test split is read from, in words."""
  if data.get("folder"):
    return f"the folder {_resolved(data['folder'])}"
  if data.get("name") == "synthetic":
    return "synthetic (random) data"
  where = f" in {_resolved(data['data_dir'])}" if data.get("data_dir") else ""
  return f"tfds {data.get('name')!r}{where}"


def _resolved(path: str) -> str:
  """A local path as the data reader opens it (a URL as it is)."""
  return path if "://" in path else os.path.realpath(os.path.expanduser(path))


if __name__ == "__main__":
  cli.run(main)
