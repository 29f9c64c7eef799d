r"""CTKD (+Sort) on ImageNet, learnable temperature, 5-epoch λ ramp.

mdistiller's ImageNet recipe: batch 512, 100 epochs, lr 0.2 (×0.1 at 30, 60, 90), wd 1e-4.

  python scripts/train.py --config configs/imagenet_ctkd.py:r34_r18 \
      --workdir runs/imagenet_ctkd_r34_r18 \
      --config.data.data_dir=$TFDS_DATA_DIR

Pairs: r34_r18 (torchvision ResNet34 → ResNet18), r50_mv1 (ResNet50 → MobileNetV1). Teachers:
torchvision's v1 files converted with scripts/port_weights.py. CPU smoke test (an image folder):
`:r34_r18,runlocal --config.data.folder=DIR`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.imagenet_config(arg, method="ctkd")
