"""Distillation methods: which losses a config's `method` adds up, and where Sort goes.

A small registry in the scenic style: a config only names the method; this module turns the
student logits, the frozen teacher's logits and the labels into named loss terms. The total
loss is the sum of the terms (mdistiller sums its loss dict, spec §7.2). Definitions and
per-method weights: docs/methods.md.

The teacher's side of every method is `teacher_targets`: the frozen logits, Sort-corrected
when `config.sort`, before temperature or standardisation (Sort commutes with both, so every
method sees the same corrected logits). It is per example and does not depend on the student,
so the trainer computes it once per dispatch for all the steps of that dispatch.

A method is a function `(config, z, v, y, epoch, params) -> {name: scalar}` in `_REGISTRY`:
student logits z, Sort-corrected teacher logits v, labels y, the 1-based epoch and the trainable
parameters it adds beside the student's (`init_params`: CTKD's θ; empty for the others). Its
terms come already weighted; the trainer sums them and logs each as `loss_<name>`, with
`logged_values` beside them. Its hyperparameters are the config group named after it and, for
LSKD and CTKD, `lskd` or their base loss's group as `unread_fields` says (configs/common.py
gives every recipe every group); a resume may change the groups a method does not read.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from sortkd_jax import losses
from sortkd_jax.sort import sort_teacher_logits

LossTerms = dict[str, jax.Array]

BASE_LOSSES = ("kd", "dkd")


def uses_teacher(config: ml_collections.ConfigDict) -> bool:
  return config.method != "vanilla"


def unread_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config groups and fields that `config.method` never reads, so that a resumed run may
  change them: the other methods' hyperparameter groups, and without a teacher the teacher
  group and `sort`. LSKD, and CTKD with `standardize`, weigh KD by `lskd`'s fields but DKD by
  `dkd`'s, scaled; CTKD without it reads its base loss's group."""
  read = {config.method}
  if config.method in ("lskd", "ctkd"):
    base = config[config.method].base
    standardized = config.method == "lskd" or config.ctkd.standardize
    if standardized:
      read.add("lskd")
    if base == "dkd" or not standardized:
      read.add(base)
  unread = sorted(set(_REGISTRY) - {"vanilla"} - read)
  return tuple(unread) if uses_teacher(config) else (*unread, "teacher", "sort")


def init_params(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """The trainable parameters `config.method` adds beside the student's, optimised with them by
  the same SGD (methods.md): CTKD's scalar θ, from `config.ctkd.init`; none for the others."""
  if config.method == "ctkd":
    return {"ctkd_theta": jnp.asarray(config.ctkd.init, jnp.float32)}
  return {}


def logged_values(config: ml_collections.ConfigDict,
                  params: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """What a method logs per step beside its loss terms, from its `init_params` as the step's
  loss used them: CTKD's learned temperature."""
  if config.method == "ctkd":
    return {"ctkd_temperature": losses.ctkd_temperature(params["ctkd_theta"], config.ctkd.t_start,
                                                        config.ctkd.t_end)}
  return {}


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails early, naming the valid choices, for an unknown method or base loss."""
  if config.method not in _REGISTRY:
    raise ValueError(f"Unknown config.method {config.method!r}; choose one of "
                     f"{tuple(_REGISTRY)}.")
  if uses_teacher(config) and config.method not in config:
    raise ValueError(f"The config has no {config.method!r} group for the hyperparameters of "
                     f"config.method {config.method!r} (configs/common.py gives them).")
  for group in ("lskd", "ctkd"):
    if config.method == group and config[group].base not in BASE_LOSSES:
      raise ValueError(f"config.{group}.base must be one of {BASE_LOSSES}, "
                       f"got {config[group].base!r}.")
  # Out of range, these showed only later, as a NaN loss (logits divided by a temperature of 0
  # or inf), or never: a negative weight ascends its loss, which the run logs as negative.
  ranges = {}
  weights = {"kd": ("ce_weight", "kd_weight"), "dkd": ("ce_weight", "alpha", "beta"),
             "lskd": ("ce_weight", "kd_weight", "dkd_weight_scale")}
  for group, names in weights.items():
    if group in config:
      ranges[f"{group}.temperature"] = (config[group].temperature > 0, "positive")
      ranges.update({f"{group}.{n}": (config[group][n] >= 0, "at least 0") for n in names})
  if "dkd" in config:  # its loss's factor divides by it
    ranges["dkd.warmup_epochs"] = (config.dkd.warmup_epochs > 0,
                                   "positive (epochs until DKD's loss has its full weight)")
  if "ctkd" in config:  # τ = t_start + t_end·sigmoid(θ) lies in (t_start, t_start + t_end)
    ranges.update({"ctkd.t_start": (config.ctkd.t_start > 0, "positive"),
                   "ctkd.t_end": (config.ctkd.t_end >= 0, "at least 0"),
                   "ctkd.init": (True, "finite"),  # θ₀: any finite number
                   "ctkd.ramp_epochs": (config.ctkd.ramp_epochs > 0,  # λ's ramp divides by it
                                        "positive (epochs until λ reaches 1)")})
  for key, (in_range, wanted) in ranges.items():
    value = config[key]
    if not math.isfinite(value):
      raise ValueError(f"config.{key} must be a finite number, got {value!r}.")
    if not in_range:
      raise ValueError(f"config.{key} must be {wanted}, got {value!r}.")


def _kd(z, v, y, *, ce_weight, kd_weight, temperature, ce_logits=None) -> LossTerms:
  """methods.md KD: λ_CE·CE + λ_KD·T²·KL."""
  ce_logits = z if ce_logits is None else ce_logits
  return {"ce": ce_weight * losses.cross_entropy(ce_logits, y),
          "kd": kd_weight * losses.kd(z, v, temperature)}


def _dkd(z, v, y, epoch, *, ce_weight, alpha, beta, temperature, warmup_epochs,
         ce_logits=None) -> LossTerms:
  """methods.md DKD: λ_CE·CE + min(epoch/warmup, 1)·(α·TCKD + β·NCKD)."""
  ce_logits = z if ce_logits is None else ce_logits
  warmup = losses.dkd_warmup_factor(epoch, warmup_epochs)
  return {"ce": ce_weight * losses.cross_entropy(ce_logits, y),
          "kd": warmup * losses.dkd(z, v, y, alpha, beta, temperature)}


def _standardized(config, z, v, y, epoch, base: str, temperature) -> LossTerms:
  """LSKD: the base loss on z-scored logits at base temperature τ; CE keeps the raw logits."""
  zs, vs = losses.standardize(z), losses.standardize(v)
  ls = config.lskd
  if base == "kd":
    return _kd(zs, vs, y, ce_weight=ls.ce_weight, kd_weight=ls.kd_weight,
               temperature=temperature, ce_logits=z)
  d = config.dkd
  return _dkd(zs, vs, y, epoch, ce_weight=d.ce_weight, alpha=d.alpha * ls.dkd_weight_scale,
              beta=d.beta * ls.dkd_weight_scale, temperature=temperature,
              warmup_epochs=d.warmup_epochs, ce_logits=z)


def _vanilla(config, z, v, y, epoch, params) -> LossTerms:
  return {"ce": losses.cross_entropy(z, y)}


def _kd_method(config, z, v, y, epoch, params) -> LossTerms:
  return _kd(z, v, y, **config.kd)


def _dkd_method(config, z, v, y, epoch, params) -> LossTerms:
  return _dkd(z, v, y, epoch, **config.dkd)


def _lskd_method(config, z, v, y, epoch, params) -> LossTerms:
  return _standardized(config, z, v, y, epoch, config.lskd.base, config.lskd.temperature)


def _ctkd_method(config, z, v, y, epoch, params) -> LossTerms:
  """CTKD (global): τ = t_start + t_end·sigmoid(θ) with θ behind a gradient-reversal layer.

  θ ascends the distillation loss while the student descends it; λ follows the cosine ramp.
  The learned τ replaces the base loss's temperature (KD's T, DKD's T, or LSKD's τ).
  """
  c = config.ctkd
  reversed_theta = losses.reverse_gradient(params["ctkd_theta"],
                                           losses.ctkd_lambda(epoch, c.ramp_epochs))
  temperature = losses.ctkd_temperature(reversed_theta, c.t_start, c.t_end)
  if c.standardize:
    terms = _standardized(config, z, v, y, epoch, c.base, temperature)
  elif c.base == "kd":
    terms = _kd(z, v, y, **{**config.kd, "temperature": temperature})
  else:
    terms = _dkd(z, v, y, epoch, **{**config.dkd, "temperature": temperature})
  return terms


_REGISTRY: dict[str, Callable[..., LossTerms]] = {
    "vanilla": _vanilla, "kd": _kd_method, "dkd": _dkd_method,
    "lskd": _lskd_method, "ctkd": _ctkd_method,
}


def teacher_targets(config: ml_collections.ConfigDict, teacher_logits: jax.Array,
                    labels: jax.Array) -> jax.Array:
  """The teacher logits every loss of `config.method` sees: frozen, and Sort-corrected when
  `config.sort`. Rows are independent, so any leading batch shape works."""
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  return sort_teacher_logits(teacher_logits, labels) if config.sort else teacher_logits


def loss_terms(config: ml_collections.ConfigDict, student_logits: jax.Array,
               teacher_logits: jax.Array | None, labels: jax.Array, epoch: jax.Array,
               params: dict[str, jax.Array] | None = None) -> LossTerms:
  """The named, weighted loss terms of `config.method` for one batch.

  Args:
    student_logits: [B, K] raw student logits (gradients flow through them).
    teacher_logits: [B, K] `teacher_targets` of the frozen teacher's logits (Sort already
      applied), or None for `vanilla`.
    labels: [B] integer labels.
    epoch: the 1-based epoch of this step (DKD warm-up and CTKD's λ depend on it).
    params: the method's trainable parameters, as `init_params` makes them (CTKD's θ).
  """
  validate(config)
  if uses_teacher(config) and teacher_logits is None:
    raise ValueError(f"config.method {config.method!r} needs the teacher's logits; "
                     "got teacher_logits=None.")
  if params is not None and not isinstance(params, dict):
    raise TypeError(f"params is a dict, as methods.init_params(config) makes, e.g. "
                    f"{{'ctkd_theta': θ}}; got {type(params).__name__}.")
  params = params or {}
  missing = init_params(config).keys() - params.keys()
  if missing:
    raise ValueError(f"config.method {config.method!r} needs its trainable parameters "
                     f"{sorted(missing)} (methods.init_params makes them); got {sorted(params)}.")
  terms = _REGISTRY[config.method](config, student_logits, teacher_logits, labels, epoch,
                                   params)
  shapes = {name: jax.numpy.shape(term) for name, term in terms.items()}
  if any(shapes.values()):  # summed into the loss, a [B] term would become a [B] "loss"
    raise ValueError(f"config.method {config.method!r} must give scalar loss terms, got shapes "
                     f"{shapes}.")
  return terms
