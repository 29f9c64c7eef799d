r"""KD + logit standardisation (+Sort) on ImageNet, τ=2, KD 9; CE 1.0 for r34_r18 (published),
0.1 for r50_mv1 (not published: the CIFAR value).

mdistiller's ImageNet recipe: batch 512, 100 epochs, lr 0.2 (×0.1 at 30, 60, 90), wd 1e-4.

  python scripts/train.py --config configs/imagenet_lskd.py:r34_r18 \
      --workdir runs/imagenet_lskd_r34_r18 \
      --config.data.data_dir=$TFDS_DATA_DIR

Pairs: r34_r18 (torchvision ResNet34 → ResNet18), r50_mv1 (ResNet50 → MobileNetV1). Teachers:
torchvision's v1 files converted with scripts/port_weights.py. CPU smoke test (an image folder):
`:r34_r18,runlocal --config.data.folder=DIR`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.imagenet_config(arg, method="lskd")
