"""KD + logit standardisation (LSKD, +Sort) on CIFAR-100: z-scored logits, τ=2, CE 0.1, KD 9.

  python scripts/train.py --config configs/cifar_lskd.py:res32x4_res8x4 --workdir runs/lskd_res32x4_res8x4

DKD + LS instead: `--config.lskd.base=dkd` (α and β ×9, T=τ, DKD's CE weight and warm-up).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.cifar_config(arg, method="lskd")
