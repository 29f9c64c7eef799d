"""Trains a student by (Sort-)distillation; re-running the same command resumes.

  python scripts/train.py --config configs/cifar_kd.py:res32x4_res8x4 --workdir runs/kd

Any config field can be overridden, e.g. `--config.sort=False --config.data.folder=DIR`.
Several hosts: launch one process per host (SLURM and Open MPI are detected), or pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from sortkd_jax import reporting, train  # noqa: E402

reporting.define_config_flag(None, "Experiment recipe, e.g. configs/cifar_kd.py:res32x4_res8x4.",
                             lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  reporting.quiet_library_info_logs()
  try:
    train.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                       FLAGS.process_id)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
    # Bad input (config, data, teacher) or a diverged run: the message says what to do; the
    # traceback is still there with --verbosity=1.
    logging.debug("Traceback:", exc_info=True)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=reporting.parse_flags_briefly)
