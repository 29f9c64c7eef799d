r"""KD (+Sort) on CIFAR-100: Hinton's KD with T=4, CE 0.1, KD 0.9, teacher logits sorted.

  python scripts/train.py --config configs/cifar_kd.py:res32x4_res8x4 \
      --workdir runs/kd_res32x4_res8x4

Baseline without Sort: add `--config.sort=False`. CPU smoke test: `:res32x4_res8x4,runlocal`.
Pairs: configs/common.py CIFAR_PAIRS. Teacher: `teachers/<name>` from scripts/port_weights.py.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.cifar_config(arg, method="kd")
