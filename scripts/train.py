"""Trains a student by (Sort-)distillation; re-running the same command resumes.

  python scripts/train.py --config configs/cifar_kd.py:res32x4_res8x4 --workdir runs/kd

Recipes: configs/cifar_{vanilla,kd,dkd,lskd,ctkd}.py and configs/imagenet_{kd,dkd,lskd,ctkd}.py,
each taking a teacher_student pair after the colon (an unknown one lists them; README: Configs
and pairs); cifar_vanilla.py also a model to train, e.g. `:resnet32x4` for a teacher. Any
config field can be overridden, e.g. `--config.sort=False --config.data.folder=DIR`; a short
trial: `--config.data.max_train_examples=N`.
Several hosts: under SLURM or Open MPI 4 (detected) launch one process per GPU; otherwise one per
host, each passing `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (README).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from sortkd_jax import cli, distributed, train  # noqa: E402

cli.define_config_flag(None, "Experiment recipe, e.g. configs/cifar_kd.py:res32x4_res8x4.",
                       lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main():
  distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
