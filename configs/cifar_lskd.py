r"""KD + logit standardisation (LSKD, +Sort) on CIFAR-100: z-scored logits, τ=2, CE 0.1, KD 9.

As the published runs: τ=3 for vgg13_vgg8 and vgg13_mv2, τ=3 and KD 1 for res50_mv2
(common.KD_LS_PUBLISHED).

  python scripts/train.py --config configs/cifar_lskd.py:res32x4_res8x4 \
      --workdir runs/lskd_res32x4_res8x4

DKD + LS instead: `--config.lskd.base=dkd` (α and β ×9, T=τ, DKD's CE weight and warm-up). It
keeps the pair's τ above; methods.md's DKD+LS has τ=2 on every pair, so on those three pairs add
`--config.lskd.temperature=2`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.cifar_config(arg, method="lskd")
