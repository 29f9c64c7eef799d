"""The mdistiller model zoo in Flax NNX (spec §2–§4), with a name → constructor registry.

``create_model(name, num_classes=None, *, rngs, dtype=jnp.float32)`` builds any of the 27
architectures of ``mdistiller_state_dict_keys.json``: the CIFAR registry names and
``imagenet_ResNet18/34/50``, ``imagenet_MobileNetV1``. Models take NHWC float input and
return float32 logits ``[B, num_classes]``; parameters are float32 ``nnx.Param``, BN
running statistics float32 ``nnx.BatchStat``, and ``dtype`` is the compute dtype.

A fresh model is in train mode (as a fresh torch module); ``model.eval()`` /
``model.train()`` switch every BatchNorm. Attribute paths mirror the PyTorch state-dict
keys (``sortkd_jax.porting`` translates them).
"""

from __future__ import annotations

import operator
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sortkd_jax.models import (cifar_resnet, imagenet_resnet, mobilenetv1, mobilenetv2,
                               resnetv2, shufflenetv1, shufflenetv2, vgg, wrn)
from sortkd_jax.models.folding import fold_batchnorm
from sortkd_jax.models.layers import BatchNorm

__all__ = ["MODEL_NAMES", "check_name", "create_model", "abstract_model", "model_from_pure_dicts",
           "count_params", "default_num_classes", "native_image_size", "fold_batchnorm",
           "BatchNorm"]

# name -> (builder(name, num_classes, *, rngs, dtype), default num_classes, native image size)
_REGISTRY: dict[str, tuple[Callable[..., nnx.Module], int, int]] = {}
for _family, _classes, _size in (
    (cifar_resnet, 100, 32), (wrn, 100, 32), (vgg, 100, 32), (mobilenetv2, 100, 32),
    (shufflenetv1, 100, 32), (shufflenetv2, 100, 32), (resnetv2, 100, 32),
    (imagenet_resnet, 1000, 224), (mobilenetv1, 1000, 224)):
  for _name in _family.CONFIGS:
    _REGISTRY[_name] = (_family.build, _classes, _size)

# Same order as mdistiller_state_dict_keys.json.
MODEL_NAMES: tuple[str, ...] = (
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8",
    "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50",
    "ResNet18", "imagenet_ResNet18", "imagenet_ResNet34", "imagenet_ResNet50",
    "imagenet_MobileNetV1")
assert set(MODEL_NAMES) == set(_REGISTRY), sorted(set(MODEL_NAMES) ^ set(_REGISTRY))


def check_name(name: str, what: str = "model name") -> None:
  """Fails for a name that is not in the zoo, listing the valid ones, and naming the one it
  spells otherwise (case, `_` or `-`: mdistiller's `wrn_40_2` typed as `wrn40_2`)."""
  if name not in _REGISTRY:
    spelling = lambda n: n.lower().replace("_", "").replace("-", "")
    meant = [n for n in MODEL_NAMES if spelling(n) == spelling(str(name))]
    hint = f" (did you mean {meant[0]!r}?)" if meant else ""
    raise ValueError(f"Unknown {what} {name!r}{hint}. Valid names: {', '.join(MODEL_NAMES)}.")


def default_num_classes(name: str) -> int:
  """100 for the CIFAR names, 1000 for ``imagenet_*``."""
  check_name(name)
  return _REGISTRY[name][1]


def native_image_size(name: str) -> int:
  """The image size mdistiller trains the architecture at: 32 (CIFAR), 224 (``imagenet_*``)."""
  check_name(name)
  return _REGISTRY[name][2]


def create_model(name: str, num_classes: int | None = None, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32) -> nnx.Module:
  """Builds the named architecture with the reference initialisation (spec §1 table).

  Args:
    name: one of ``MODEL_NAMES`` (case-sensitive, as in mdistiller's registries).
    num_classes: classifier width; None → 100 (CIFAR) or 1000 (``imagenet_*``).
    rngs: ``nnx.Rngs`` for initialisation (only the ``params`` stream is used, and no RNG
      state is kept in the model).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and BN statistics stay
      float32, and the classifier computes in float32 (logits are not rounded to bf16).
  """
  check_name(name)
  builder, default, _ = _REGISTRY[name]
  if num_classes is None:
    num_classes = default
  try:  # ints and NumPy ints; not floats or bools
    n = None if isinstance(num_classes, bool) else operator.index(num_classes)
  except TypeError:
    n = None
  if n is None or n < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
  num_classes = n
  return builder(name, num_classes, rngs=rngs, dtype=dtype)


def abstract_model(name: str, num_classes: int | None = None, *,
                   dtype: jnp.dtype = jnp.float32) -> nnx.Module:
  """The named architecture with shapes and dtypes only, no weights computed: the structure
  that a checkpoint or a state dict fills."""
  return nnx.eval_shape(lambda: create_model(name, num_classes, rngs=nnx.Rngs(0), dtype=dtype))


def model_from_pure_dicts(name: str, num_classes: int | None, params: dict,
                          batch_stats: dict, *, dtype: jnp.dtype = jnp.float32) -> nnx.Module:
  """The named architecture holding `params` and `batch_stats` (nested dicts, as
  ``nnx.to_pure_dict`` writes them), in eval mode."""
  graphdef, abstract_params, abstract_stats = nnx.split(
      abstract_model(name, num_classes, dtype=dtype), nnx.Param, nnx.BatchStat)
  _check_fits(name, num_classes, {"params": nnx.to_pure_dict(abstract_params),
                                  "batch_stats": nnx.to_pure_dict(abstract_stats)},
              {"params": params, "batch_stats": batch_stats})
  nnx.replace_by_pure_dict(abstract_params, params)
  nnx.replace_by_pure_dict(abstract_stats, batch_stats)
  model = nnx.merge(graphdef, abstract_params, abstract_stats)
  model.eval()
  return model


def _check_fits(name: str, num_classes: int | None, expected: dict, given: dict) -> None:
  """Raises, naming the first difference, unless `given` has `expected`'s arrays and shapes."""
  def shapes(tree):
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(jnp.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  want, got = shapes(expected), shapes(given)
  model = f"a {name} with {num_classes or default_num_classes(name)} classes"
  for path in sorted(want.keys() | got.keys()):
    if path not in got:
      raise ValueError(f"The weights do not fit {model}: they have no {path}.")
    if path not in want:
      raise ValueError(f"The weights do not fit {model}, which has no {path}.")
  for path in sorted(want):
    if want[path] != got[path]:
      raise ValueError(f"The weights do not fit {model}: their {path} has shape "
                       f"{got[path]}, where {model} has {want[path]}.")


def count_params(model: nnx.Module) -> int:
  """Number of trainable scalars (``nnx.Param``); BN running stats are not counted,
  matching the spec's parameter table (§4)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
