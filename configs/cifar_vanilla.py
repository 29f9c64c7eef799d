r"""Plain cross-entropy training on CIFAR-100 (mdistiller's vanilla.yaml): teachers, baselines.

  python scripts/train.py --config configs/cifar_vanilla.py:resnet32x4 --workdir runs/resnet32x4

The argument names the model to train: a CIFAR model (`resnet56`, `wrn_40_2`, `vgg13`, ...; its
workdir can then be a distillation run's `--config.teacher.checkpoint`), or a pair, whose
student it trains (the baseline of a pair table row; the default, res32x4_res8x4, is
vanilla.yaml's resnet8x4); `,runlocal` after either gives the smoke test. lr 0.05, or 0.01 for
MobileNetV2 and the ShuffleNets, as in the pairs' recipes. No teacher is loaded.
"""

import ml_collections

from configs import common
from sortkd_jax import models

CIFAR_MODELS = tuple(name for name in models.MODEL_NAMES if not name.startswith("imagenet_"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or "").split(",")[0]
  if name.startswith("imagenet_"):
    raise ValueError(f"{name} is an ImageNet model: train it with --config "
                     "configs/imagenet_kd.py --config.method=vanilla "
                     f"--config.student.name={name}.")
  config = common.cifar_config(arg, method="vanilla", models=CIFAR_MODELS)
  config.sort = False
  return config
