r"""Plain cross-entropy training on CIFAR-100 (mdistiller's vanilla.yaml): teachers, baselines.

  python scripts/train.py --config configs/cifar_vanilla.py:res32x4_res8x4 \
      --workdir runs/vanilla_res8x4

The pair's student is trained; no teacher is loaded. Train a teacher architecture with
`--config.student.name=resnet32x4`; its workdir can then be a distillation run's
`--config.teacher.checkpoint`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.cifar_config(arg, method="vanilla")
  config.sort = False
  return config
