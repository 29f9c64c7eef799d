r"""DKD (+Sort) on CIFAR-100: α=1, β per pair (2 / 6 / 8), T=4, CE 1.0, 20-epoch loss warm-up.

  python scripts/train.py --config configs/cifar_dkd.py:res32x4_res8x4 \
      --workdir runs/dkd_res32x4_res8x4

Baseline without Sort: add `--config.sort=False`. β per pair: configs/common.py CIFAR_PAIRS.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.cifar_config(arg, method="dkd")
