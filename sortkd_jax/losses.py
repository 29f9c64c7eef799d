"""Logit distillation losses: CE, KD, DKD, LSKD's z-score and CTKD's temperature machinery.

Formulas follow docs/methods.md and the reference-code description in docs/mdistiller_spec.md
§8 ("spec §N" below).
Conventions shared by every loss here:

* Inputs in bfloat16/float16 (or float32) are cast to float32 at entry; float64 stays float64.
  Losses return scalars of that compute dtype.
* KL(p||q) = sum_i p_i (log p_i - log q_i) over classes, with 0 * log 0 = 0, averaged over all
  leading (batch) dimensions; distillation terms carry the T**2 factor.
* Temperatures, loss weights and epochs may be traced arrays (CTKD learns T); nothing branches on
  them in Python, so every function is jit-able.
* Teacher logits are wrapped in ``lax.stop_gradient``: the reference computes them under
  ``no_grad``. Gradients still reach a learned temperature through both softmaxes.
* Labels must lie in ``[0, K)``. Concrete (not traced) labels outside it, or a concrete
  temperature that is not positive, raise; under ``jit`` nothing can be raised, so the loss
  rows of such labels are NaN (never a wrapped-around class) and a training loop sees a NaN loss.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

__all__ = [
  "check_labels",
  "label_index",
  "target_index",
  "cross_entropy",
  "topk_correct",
  "kd",
  "dkd",
  "dkd_warmup_factor",
  "standardize",
  "ctkd_temperature",
  "ctkd_lambda",
  "reverse_gradient",
]

ArrayLike = jax.typing.ArrayLike


def _compute(x: ArrayLike) -> jax.Array:
  """Cast to the compute dtype: at least float32 (bf16/f16 upcast), float64 arrays kept. Python
  numbers (a temperature, an epoch) are float32: with jax_enable_x64 they would be float64 and
  promote a float32 loss."""
  if isinstance(x, (int, float)):
    return jnp.asarray(x, jnp.float32)
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _kl_terms(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """The terms p (log p - log q) of KL(p||q), elementwise.

  Where p is 0 (underflow, or a teacher logit of -inf: a masked class) the term is 0, the
  0 * log 0 = 0 convention of ``F.kl_div``; the inner ``where`` keeps -inf out of the gradient.
  A NaN p stays NaN: a damaged teacher must not give a finite loss.
  """
  zero = p == 0
  return jnp.where(zero, 0.0, p * (jnp.where(zero, 0.0, log_p) - log_q))


def _kl_rows(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Row-wise KL(p||q) from log-probabilities, summed over the last axis."""
  return jnp.sum(_kl_terms(jnp.exp(log_p), log_p, log_q), axis=-1)


def _teacher_scaled(teacher_logits: jax.Array, t: jax.Array) -> jax.Array:
  """stop_gradient(v) / t, with -inf logits (masked classes) kept out of t's gradient."""
  v = lax.stop_gradient(teacher_logits)
  masked = jnp.isneginf(v)
  return jnp.where(masked, -jnp.inf, jnp.where(masked, 0.0, v) / t)


def _check_shapes(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: jax.Array, **weights: ArrayLike) -> None:
  """Same-shape logits, one temperature and scalar weights: a [B, 1] temperature or a
  per-example weight would broadcast into a [B, 1] or [B] "loss"."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits "
                     f"{teacher_logits.shape} must have the same shape")
  for name, value in {"the temperature": temperature, **weights}.items():
    if jnp.ndim(value):
      raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")


def _check_positive(name: str, value: ArrayLike) -> None:
  """Refuses a concrete value that is not positive. Checked in NumPy, before any `jnp` op: under
  `jit` that would make even a Python constant a tracer."""
  if not isinstance(value, jax.core.Tracer) and not np.all(np.asarray(value) > 0):
    raise ValueError(f"{name} must be positive, got {value}")


def check_labels(logits: jax.Array, labels: jax.Array) -> None:
  """Raises unless ``labels`` are integers of shape ``logits.shape[:-1]``: a [B, 1] column or
  one-hot rows would otherwise broadcast into a loss of the wrong value."""
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got {labels.dtype}")
  if logits.ndim < 1:
    raise ValueError(f"logits need a class axis, [..., K]; got shape {logits.shape}")
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels shape {labels.shape} must equal logits.shape[:-1] of "
                     f"{logits.shape}")


def target_index(logits: jax.Array, labels: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """`label_index` of labels used as targets, after `check_labels`; concrete labels outside
  ``[0, K)`` raise (traced ones cannot: callers must handle their rows).

  Host labels are checked before they become a JAX array: without ``jax_enable_x64`` that
  narrows int64 to int32, which would wrap a label of 2**32 + 3 into class 3."""
  host = None if isinstance(labels, jax.Array) else np.asarray(labels)
  labels = jnp.asarray(labels)
  check_labels(logits, labels)
  num_classes = logits.shape[-1]
  if host is not None and host.dtype.kind in "iu" and not jax.config.jax_enable_x64:
    int32 = np.iinfo(np.int32)
    _refuse_labels(num_classes, host[(host < int32.min) | (host > int32.max)])
  index, in_range = label_index(labels, num_classes)
  if not isinstance(in_range, jax.core.Tracer):
    _refuse_labels(num_classes, labels[~in_range])
  return index, in_range


def out_of_range_as_nan(values: jax.Array, in_range: jax.Array) -> jax.Array:
  """`values`, NaN where `in_range` is False: the rows of traced out-of-range labels. Concrete
  labels were checked by `target_index`, so their values come back as they are (an eager
  `where` with a NaN operand trips jax_debug_nans, though no NaN reaches its result)."""
  if not isinstance(in_range, jax.core.Tracer):
    return values
  return jnp.where(in_range, values, jnp.nan)


def _refuse_labels(num_classes: int, bad: ArrayLike) -> None:
  """Raises naming the (concrete) labels `bad`, if any."""
  bad = sorted({int(y) for y in np.ravel(bad)})
  if bad:
    raise ValueError(f"labels must lie in [0, {num_classes}) (the logits' classes), got "
                     f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")


def label_index(labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """The labels as int32 class indices (0 where out of range) and whether each is in
  ``[0, num_classes)``. The range is checked in the labels' own dtype, so neither a narrow one
  (uint8 labels of 1000 classes) nor a wide one (an int64 label of 2**32 + 3 with
  ``jax_enable_x64``) wraps around into a valid class."""
  in_range = labels >= 0
  if num_classes <= jnp.iinfo(labels.dtype).max:  # else every non-negative label fits
    in_range &= labels < num_classes
  return jnp.where(in_range, labels, 0).astype(jnp.int32), in_range


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """Mean softmax cross-entropy at temperature 1, no label smoothing (spec §8.1)."""
  logits = _compute(logits)
  index, in_range = target_index(logits, labels)
  rows = optax.losses.softmax_cross_entropy_with_integer_labels(logits, index)
  return jnp.mean(out_of_range_as_nan(rows, in_range))


def topk_correct(logits: ArrayLike, labels: ArrayLike, k: int) -> jax.Array:
  """Whether each label is among the top-``k`` logits, as a bool array of shape ``labels.shape``.

  The label's rank is the number of classes strictly above it plus the equal-valued classes of
  lower index, i.e. ties go to the lower class index, as in ``jax.lax.top_k`` and a stable
  descending sort. ``torch.topk(k, largest=True, sorted=True)`` does not specify which tied
  element it returns (on CPU it does not follow index order), so only exact ties at the k-th
  place can make the two disagree. Labels outside ``[0, K)`` count as wrong, and so does every
  row with a NaN logit, wherever it is: NaN compares false with everything, so otherwise a NaN
  label logit would rank first and a model whose weights are damaged would score 100%.
  """
  x, labels = jnp.asarray(logits), jnp.asarray(labels)
  check_labels(x, labels)
  index, valid = label_index(labels, x.shape[-1])
  index = index[..., None]
  x_label = jnp.take_along_axis(x, index, axis=-1)
  cls = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  ahead = (x > x_label) | ((x == x_label) & (cls < index))
  no_nan = ~jnp.any(jnp.isnan(x), axis=-1)
  return (jnp.sum(ahead, axis=-1) < k) & valid & no_nan


def kd(student_logits: ArrayLike, teacher_logits: ArrayLike, temperature: ArrayLike) -> jax.Array:
  """Hinton KD: T**2 * mean_b KL(softmax(v/T) || softmax(z/T)) (methods.md "KD", spec §8.2)."""
  _check_positive("the temperature", temperature)
  t, z, v = _compute(temperature), _compute(student_logits), _compute(teacher_logits)
  _check_shapes(z, v, t)
  log_q = jax.nn.log_softmax(z / t, axis=-1)
  log_p = jax.nn.log_softmax(_teacher_scaled(v, t), axis=-1)
  return jnp.mean(_kl_rows(log_p, log_q)) * t**2


def _binary_log_probs(scaled: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log p_y and log sum_{i != y} p_i of softmax(scaled), through the binary logit.

  With l = scaled_y - logsumexp_{i != y} scaled_i, the two are log_sigmoid(l) and
  log_sigmoid(-l): in exact arithmetic the reference's log of masked sums of the softmax, but
  finite when one probability underflows in float32 (the reference then takes log 0), and more
  accurate near b = 1 than either log of a masked sum or a difference of two log-sum-exps.
  """
  other_lse = jax.nn.logsumexp(jnp.where(target, -jnp.inf, scaled), axis=-1)
  logit = jnp.sum(jnp.where(target, scaled, 0.0), axis=-1) - other_lse
  return jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)


def dkd(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  labels: ArrayLike,
  alpha: ArrayLike,
  beta: ArrayLike,
  temperature: ArrayLike,
) -> jax.Array:
  """Decoupled KD, alpha * TCKD + beta * NCKD, without the warm-up (methods.md "DKD", spec §8.3).

  TCKD = T**2 * mean_b KL(b_v || b_z) over the binary [target, non-target] probabilities. As in
  the reference (spec §8.3), the teacher's b is a masked sum of its softmax, not the 1 - p_y of
  methods.md (equal in exact arithmetic, not in float32); the logs of both binary
  distributions come from log-sum-exp of the masked logits (``_binary_log_probs``) instead of
  ``log`` of those sums: the same value in exact arithmetic, without the reference's infinite
  loss when a student probability underflows.

  NCKD = T**2 * mean_b KL(softmax(v/T - 1000 e_y) || softmax(z/T - 1000 e_y)). The -1000 offset
  on the temperature-scaled target logit is kept for parity with the reference: it equals exact
  exclusion of the target unless that scaled logit leads all others by more than ~900, where
  the reference itself stops excluding it.
  """
  _check_positive("the temperature", temperature)
  t, z, v = _compute(temperature), _compute(student_logits), _compute(teacher_logits)
  _check_shapes(z, v, t, alpha=alpha, beta=beta)
  index, in_range = target_index(z, labels)  # one_hot would count in the labels' dtype
  z, v = z / t, _teacher_scaled(v, t)
  target = jax.nn.one_hot(index, z.shape[-1], dtype=jnp.bool_)

  p_v = jax.nn.softmax(v, axis=-1)
  b_v_target = jnp.sum(jnp.where(target, p_v, 0.0), axis=-1)
  b_v_other = jnp.sum(jnp.where(target, 0.0, p_v), axis=-1)
  log_v_target, log_v_other = _binary_log_probs(v, target)
  log_z_target, log_z_other = _binary_log_probs(z, target)
  tckd_rows = (_kl_terms(b_v_target, log_v_target, log_z_target)
               + _kl_terms(b_v_other, log_v_other, log_z_other))
  tckd = jnp.mean(out_of_range_as_nan(tckd_rows, in_range)) * t**2

  offset = jnp.where(target, 1000.0, 0.0)
  nckd_rows = _kl_rows(jax.nn.log_softmax(v - offset), jax.nn.log_softmax(z - offset))
  nckd = jnp.mean(out_of_range_as_nan(nckd_rows, in_range)) * t**2
  return alpha * tckd + beta * nckd


def dkd_warmup_factor(epoch: ArrayLike, warmup: ArrayLike) -> jax.Array:
  """DKD's loss warm-up min(epoch / warmup, 1), epochs counted from 1 (spec §8.3, item 6)."""
  _check_positive("the warm-up epochs", warmup)  # 0 gave NaN, a negative one a negated loss
  return jnp.minimum(_compute(epoch) / warmup, 1.0)


def standardize(logits: ArrayLike, eps: float = 1e-7) -> jax.Array:
  """LSKD's per-row z-score (x - mean) / (eps + std), std with the 1/(K-1) estimator.

  methods.md "LSKD" (Sun et al., CVPR 2024), as the reference code (the paper writes 1/K).
  A constant row maps to zeros; its gradient is kept finite by a guarded square root.
  """
  x = _compute(logits)
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.sum(centred**2, axis=-1, keepdims=True) / (x.shape[-1] - 1)
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  return centred / (eps + std)


def ctkd_temperature(theta: ArrayLike, t_start: float = 1.0, t_end: float = 20.0) -> jax.Array:
  """CTKD's global temperature t_start + t_end * sigmoid(theta) (methods.md "CTKD").

  With the defaults it lies in (1, 21); theta = 1 (the initial value) gives about 15.62.
  """
  return t_start + t_end * jax.nn.sigmoid(_compute(theta))


def ctkd_lambda(epoch: ArrayLike, ramp_epochs: ArrayLike) -> jax.Array:
  """CTKD's reversal strength 1/2 (1 - cos(pi min(e, E) / E)), epochs from 1 (methods.md "CTKD").

  About 0.024 at epoch 1 for E = 10, 1 from epoch E on.
  """
  _check_positive("ramp_epochs", ramp_epochs)  # 0/0 below
  e = jnp.minimum(_compute(epoch), ramp_epochs)
  return 0.5 * (1.0 - jnp.cos(math.pi * e / ramp_epochs))


@jax.custom_vjp
def _reverse_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
  return x


def _reverse_gradient_fwd(x: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  return x, scale


def _reverse_gradient_bwd(scale: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  return (-scale * g).astype(g.dtype), jnp.zeros_like(scale)


_reverse_gradient.defvjp(_reverse_gradient_fwd, _reverse_gradient_bwd)


def reverse_gradient(x: ArrayLike, scale: ArrayLike) -> jax.Array:
  """Gradient reversal (CTKD): identity forward, cotangent multiplied by -scale backward.

  ``scale`` (CTKD's lambda) may be traced; it receives a zero cotangent.
  """
  return _reverse_gradient(jnp.asarray(x), _compute(scale))
