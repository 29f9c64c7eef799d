r"""CTKD (+Sort) on CIFAR-100: KD with a learnable global temperature and gradient reversal.

  python scripts/train.py --config configs/cifar_ctkd.py:res32x4_res8x4 \
      --workdir runs/ctkd_res32x4_res8x4

τ = 1 + 20·sigmoid(θ), θ₀ = 1; λ rises over 10 epochs. CTKD+DKD: `--config.ctkd.base=dkd`;
CTKD+LS: `--config.ctkd.standardize=True` (τ replaces LSKD's base temperature).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.cifar_config(arg, method="ctkd")
