"""Tests of the logit losses against float64 NumPy references written from the formulas."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sortkd_jax import losses, sort_teacher_logits

RTOL = 1e-5


# ---------------------------------------------------------------- float64 references
def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl_sum(p, log_q):
  """sum over all entries of p (log p - log q), with 0 log 0 = 0 (F.kl_div, reduction='sum')."""
  safe_p = np.where(p > 0, p, 1.0)
  return np.sum(np.where(p > 0, p * (np.log(safe_p) - log_q), 0.0))


def np_kd(z, v, t):
  z, v = np.float64(z), np.float64(v)
  rows = z.size // z.shape[-1]
  return t**2 * np_kl_sum(np_softmax(v / t), np_log_softmax(z / t)) / rows


def np_dkd(z, v, y, alpha, beta, t):
  """mdistiller's dkd_loss as described in spec §8.3 (masked sums, -1000 offset, sum / B)."""
  z, v = np.float64(z), np.float64(v)
  gt = np.eye(z.shape[-1])[y]
  b = len(y)

  def binary(p):
    return np.stack([(p * gt).sum(-1), (p * (1 - gt)).sum(-1)], -1)

  b_s, b_t = binary(np_softmax(z / t)), binary(np_softmax(v / t))
  tckd = np_kl_sum(b_t, np.log(b_s)) * t**2 / b
  p_t2 = np_softmax(v / t - 1000.0 * gt)
  log_p_s2 = np_log_softmax(z / t - 1000.0 * gt)
  nckd = np_kl_sum(p_t2, log_p_s2) * t**2 / b
  return alpha * tckd + beta * nckd


def np_nckd_exact(z, v, y, t):
  """NCKD with the target removed exactly: softmax over the K-1 non-target classes."""
  keep = np.eye(z.shape[-1])[y] == 0
  zs = np.float64(z)[keep].reshape(len(y), -1)
  vs = np.float64(v)[keep].reshape(len(y), -1)
  return np_kd(zs, vs, t)


def np_standardize(x, eps=1e-7):
  x = np.float64(x)
  return (x - x.mean(-1, keepdims=True)) / (eps + x.std(-1, ddof=1, keepdims=True))


def _logits(seed, shape=(8, 100), scale=3.0):
  rng = np.random.default_rng(seed)
  z = (scale * rng.standard_normal(shape)).astype(np.float32)
  v = (scale * rng.standard_normal(shape)).astype(np.float32)
  y = rng.integers(0, shape[-1], shape[:-1])
  return z, v, y


def _assert_scalar_close(actual, expected, rtol=RTOL):
  chex.assert_shape(actual, ())
  chex.assert_type(actual, jnp.float32)
  np.testing.assert_allclose(float(actual), expected, rtol=rtol)


# ---------------------------------------------------------------- CE and accuracy
def test_cross_entropy():
  z, _, y = _logits(0)
  expected = -np.mean(np_log_softmax(np.float64(z))[np.arange(len(y)), y])
  _assert_scalar_close(jax.jit(losses.cross_entropy)(z, y), expected)


def test_labels_outside_the_classes_raise_or_give_a_nan_loss():
  """-1 (a padding value) or K would train toward a wrapped-around class or give a NaN loss
  with finite gradients: refused at once, and under jit a NaN loss, gradients 0 on that row."""
  z, v, y = _logits(4, shape=(4, 10))
  uses_labels = {"ce": lambda z, y: losses.cross_entropy(z, y),
                 "dkd": lambda z, y: losses.dkd(z, v, y, 1.0, 8.0, 4.0),
                 "sort": lambda z, y: sort_teacher_logits(z, y)}
  for bad in (-1, 10):
    labels = y.copy()
    labels[3] = bad
    for name, loss in uses_labels.items():
      with pytest.raises(ValueError, match=rf"labels must lie in \[0, 10\).*got \[{bad}\]"):
        loss(z, labels)
      if name != "sort":  # its traced behaviour: tests/test_sort.py
        assert np.isnan(jax.jit(loss)(z, labels)), name
        grad = jax.jit(jax.grad(loss))(z, labels)
        assert np.all(np.isfinite(grad)) and not np.any(grad[3]), name
        np.testing.assert_allclose(grad[:3], jax.grad(loss)(z, y)[:3], rtol=1e-6)


def test_host_labels_beyond_int32_are_refused_not_wrapped():
  """Without jax_enable_x64 JAX narrows int64 to int32: 2**32 + 3 became class 3, silently."""
  assert not jax.config.jax_enable_x64
  z, v, _ = _logits(4, shape=(2, 10))
  for loss in (losses.cross_entropy, lambda z, y: losses.dkd(z, v, y, 1.0, 8.0, 4.0),
               sort_teacher_logits):
    for bad in (2**32 + 3, 2**31, -2**32):
      with pytest.raises(ValueError, match=rf"labels must lie in \[0, 10\).*got \[{bad}\]"):
        loss(z, np.array([1, bad]))
    loss(z, np.array([1, 3]))  # int64 in range: accepted


def test_dkd_warm_up_must_be_positive():
  """0 epochs gave a NaN factor, a negative count a negated DKD loss."""
  assert float(losses.dkd_warmup_factor(5, 20)) == 0.25
  for warmup in (0, -20):
    with pytest.raises(ValueError, match="the warm-up epochs must be positive"):
      losses.dkd_warmup_factor(5, warmup)


def test_bad_temperatures_weights_and_logits_are_refused():
  z, v, y = _logits(5, shape=(4, 10))
  for t in (0.0, -2.0):
    for loss in (lambda z: losses.kd(z, v, t), lambda z: losses.dkd(z, v, y, 1.0, 8.0, t)):
      for call in (loss, jax.jit(loss)):  # a constant under jit is concrete too (was NaN)
        with pytest.raises(ValueError, match="the temperature must be positive"):
          call(z)
  with pytest.raises(ValueError, match="alpha must be a scalar, got shape \\(4,\\)"):
    losses.dkd(z, v, y, jnp.ones(4), 8.0, 4.0)
  with pytest.raises(ValueError, match="logits need a class axis"):
    losses.cross_entropy(jnp.array(1.0), jnp.array(0))
  assert np.isfinite(jax.jit(jax.grad(losses.kd, argnums=2))(z, v, 4.0))  # traced: no check


def test_topk_correct_ties_go_to_lower_index():
  x = jnp.array([[1.0, 5.0, 5.0, 5.0, 2.0]] * 6)
  labels = jnp.array([1, 2, 2, 3, 4, 5])
  ks = [1, 1, 2, 3, 4, 5]
  got = [bool(losses.topk_correct(x[i], labels[i], k)) for i, k in enumerate(ks)]
  # ranks under "ties to the lower index": class 1 -> 1, 2 -> 2, 3 -> 3, 4 -> 4; label 5 invalid.
  assert got == [True, False, True, True, True, False]
  assert not bool(losses.topk_correct(x[0], jnp.array(3), 2))
  assert not bool(losses.topk_correct(x[0], jnp.array(-1), 5))


def test_topk_correct_matches_stable_ranking():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 6, (64, 10)).astype(np.float32)  # heavy ties
  y = rng.integers(0, 10, 64)
  rank = np.array([sorted(range(10), key=lambda i: (-r[i], i)).index(t) for r, t in zip(x, y)])
  for k in (1, 3, 5):
    got = jax.jit(losses.topk_correct, static_argnums=2)(x, y, k)
    chex.assert_shape(got, (64,))
    np.testing.assert_array_equal(got, rank < k)
    # Same membership as jax.lax.top_k, which also prefers the lower index on ties.
    top = np.asarray(jax.lax.top_k(x, k)[1])
    np.testing.assert_array_equal(got, (top == y[:, None]).any(-1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_topk_correct_counts_a_row_with_a_nan_logit_as_wrong(dtype):
  """A NaN-producing model must never score: NaN compares false, so the label would rank first."""
  nan = jnp.nan
  x = jnp.array([[nan] * 5,                  # all NaN (damaged weights)
                 [1.0, nan, 0.0, 0.0, 0.0],  # the label's logit is NaN
                 [9.0, 1.0, nan, 0.0, 0.0],  # another class is NaN, label would be top-1
                 [9.0, 1.0, 0.0, 0.0, 0.0],  # finite: unaffected
                 [jnp.inf, 1.0, -jnp.inf, 0.0, 0.0]], dtype)  # infinities still rank
  labels = jnp.array([0, 1, 0, 0, 0])
  for k in (1, 5):
    got = jax.jit(losses.topk_correct, static_argnums=2)(x, labels, k)
    np.testing.assert_array_equal(got, [False, False, False, True, True])
  assert not bool(losses.topk_correct(x[4], jnp.array(2), 4))  # -inf ranks last
  assert bool(losses.topk_correct(x[4], jnp.array(2), 5))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_narrow_label_dtypes_in_topk_correct_and_dkd(dtype):
  """The class index is int32 whatever the labels' dtype: with uint8 labels of 300 classes,
  topk_correct ranked label 44 against class indices modulo 256, and DKD's one-hot also marked
  classes 256-299 as targets of labels 0-43."""
  rng = np.random.default_rng(3)
  x, v = rng.standard_normal((2, 16, 300)).astype(np.float32)
  y = rng.integers(0, 120, 16)
  for k in (1, 50, 200):
    np.testing.assert_array_equal(losses.topk_correct(x, y.astype(dtype), k),
                                  losses.topk_correct(x, y.astype(np.int32), k))
  assert bool(losses.topk_correct(np.zeros((300,), np.float32), np.uint8(44), 50))
  np.testing.assert_array_equal(losses.dkd(x, v, y.astype(dtype), 1.0, 8.0, 4.0),
                                losses.dkd(x, v, y.astype(np.int32), 1.0, 8.0, 4.0))


def test_inputs_of_the_wrong_shape_or_dtype_are_refused():
  """A [B, 1] column or one-hot labels would broadcast into a loss of the wrong value."""
  z, v, y = _logits(9, shape=(4, 10))
  for labels in (y[:, None], np.eye(10)[y].astype(np.int32), y[:3]):
    with pytest.raises(ValueError, match=r"labels shape .* must equal logits.shape\[:-1\]"):
      losses.dkd(z, v, labels, 1.0, 8.0, 4.0)
    with pytest.raises(ValueError, match="must equal logits.shape"):
      losses.cross_entropy(z, labels)
    with pytest.raises(ValueError, match="must equal logits.shape"):
      losses.topk_correct(z, labels, 1)
  with pytest.raises(TypeError, match="labels must be integers, got float"):
    losses.dkd(z, v, y.astype(np.float32), 1.0, 8.0, 4.0)
  for loss in (lambda t: losses.kd(z, t, 4.0), lambda t: losses.dkd(z, t, y, 1.0, 8.0, 4.0)):
    with pytest.raises(ValueError, match=r"teacher logits \(10,\) must have the same shape"):
      loss(v[0])
  # One temperature per batch: a [B, 1] one used to return a [B, 1] "loss".
  for loss in (lambda t: losses.kd(z, v, t), lambda t: losses.dkd(z, v, y, 1.0, 8.0, t)):
    with pytest.raises(ValueError, match=r"temperature must be a scalar, got shape \(4, 1\)"):
      loss(np.full((4, 1), 4.0, np.float32))


# ---------------------------------------------------------------- KD, DKD, LSKD
@pytest.mark.parametrize("t", [1.0, 4.0, 2.5])
def test_kd_matches_reference(t):
  z, v, _ = _logits(2)
  _assert_scalar_close(jax.jit(losses.kd)(z, v, t), np_kd(z, v, t))
  # Student gradient: T * (softmax(z/T) - softmax(v/T)) / B.
  grad = jax.grad(losses.kd)(z, v, t)
  expected = t * (np_softmax(np.float64(z) / t) - np_softmax(np.float64(v) / t)) / len(z)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_kd_averages_over_all_leading_dims():
  z, v, _ = _logits(3, shape=(2, 3, 10))
  _assert_scalar_close(losses.kd(z, v, 4.0), np_kd(z, v, 4.0))


@pytest.mark.parametrize(
  "alpha,beta,t",
  [(1.0, 8.0, 4.0), (1.0, 2.0, 4.0), (1.0, 6.0, 4.0), (1.0, 0.5, 1.0), (1.0, 2.0, 1.0),
   (1.0, 0.0, 4.0), (0.0, 1.0, 4.0), (0.0, 1.0, 1.0), (1.0, 0.0, 1.0)],
)
def test_dkd_matches_reference(alpha, beta, t):
  z, v, y = _logits(4)
  v[np.arange(4), y[:4]] += 6.0  # a confident teacher on half the rows
  got = jax.jit(losses.dkd)(z, v, y, alpha, beta, t)
  _assert_scalar_close(got, np_dkd(z, v, y, alpha, beta, t))


def test_dkd_matches_reference_where_the_target_leads_by_hundreds():
  """mdistiller's NCKD offset is 1000: a target leading by 200 (after T) is still masked out,
  where a smaller offset would leave it in the non-target softmax."""
  z, v, y = _logits(8)
  rows = np.arange(len(y))
  z[rows, y] += 200.0
  v[rows, y] += 200.0
  _assert_scalar_close(losses.dkd(z, v, y, 1.0, 8.0, 1.0), np_dkd(z, v, y, 1.0, 8.0, 1.0))


def test_nckd_offset_equals_exact_exclusion():
  z, v, y = _logits(5)
  for t in (1.0, 4.0):
    exact = np_nckd_exact(z, v, y, t)
    np.testing.assert_allclose(np_dkd(z, v, y, 0.0, 1.0, t), exact, rtol=1e-12)
    _assert_scalar_close(losses.dkd(z, v, y, 0.0, 1.0, t), exact)


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), num_classes=st.integers(2, 12),
       t=st.sampled_from([1.0, 2.0, 4.0]), scale=st.sampled_from([0.5, 3.0, 8.0]))
@example(seed=0, num_classes=3, t=4.0, scale=0.5)  # examples hypothesis found: KD's rounding
@example(seed=1392, num_classes=12, t=4.0, scale=0.5)
def test_kd_decomposes_into_tckd_and_weighted_nckd(seed, num_classes, t, scale):
  """DKD's identity (Zhao et al., CVPR 2022, eq. 5), per example: KD = TCKD + (1 - p_t) NCKD,
  with p_t the teacher's target probability at temperature T. An independent check of the
  split into binary and non-target parts, from the paper rather than from the reference code."""
  z, v, y = _logits(seed, shape=(1, num_classes), scale=scale)
  p_target = np_softmax(np.float64(v) / t)[0, y[0]]
  tckd = losses.dkd(z, v, y, 1.0, 0.0, t)
  nckd = losses.dkd(z, v, y, 0.0, 1.0, t)
  # float32, as the reference: KD subtracts two log-softmaxes, each rounded to about
  # eps·(log K + max |logit| / T), so a small KL (small logits) has that error, times T².
  rounding = np.finfo(np.float32).eps * (np.log(num_classes) + np.abs([z, v]).max() / t) * t**2
  np.testing.assert_allclose(losses.kd(z, v, t), tckd + (1 - p_target) * nckd,
                             rtol=2e-5, atol=rounding)


def test_lskd_is_kd_on_standardized_logits():
  z, v, y = _logits(6, scale=7.0)
  tau = 2.0
  zs, vs = np_standardize(z), np_standardize(v)
  expected = tau**2 * np.mean(
    np.sum(np_softmax(vs / tau) * (np_log_softmax(vs / tau) - np_log_softmax(zs / tau)), -1)
  )
  got = jax.jit(lambda a, b: losses.kd(losses.standardize(a), losses.standardize(b), tau))(z, v)
  _assert_scalar_close(got, expected)
  # LSKD + DKD: alpha and beta times 9, T = tau.
  got = losses.dkd(losses.standardize(z), losses.standardize(v), y, 9.0, 72.0, tau)
  _assert_scalar_close(got, np_dkd(zs, vs, y, 9.0, 72.0, tau))


def test_standardize():
  z, _, _ = _logits(7, shape=(4, 3, 10), scale=50.0)
  z[0, 0] = 1.5  # constant row: zero spread
  z[0, 1] = 1e-6 * np.arange(10)  # a spread of the order of eps (1e-7), which then shows
  got = losses.standardize(z)
  chex.assert_shape(got, z.shape)
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got, np_standardize(z), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[0, 0], np.zeros(10))
  assert np.allclose(np.std(np.asarray(got[1:]), -1, ddof=1), 1.0, rtol=1e-5)
  chex.assert_type(losses.standardize(z.astype(jnp.bfloat16)), jnp.float32)
  grad = jax.grad(lambda a: jnp.sum(losses.standardize(a) * jnp.arange(10.0)))(jnp.asarray(z))
  assert np.isfinite(np.asarray(grad)).all()


# ---------------------------------------------------------------- dtypes, traced T, gradients
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
  z, v, y = _logits(8)
  zh, vh = jnp.asarray(z, dtype), jnp.asarray(v, dtype)
  z32, v32 = np.asarray(zh, np.float32), np.asarray(vh, np.float32)
  for fn, args, args32, ref in [
    (losses.kd, (zh, vh, 4.0), (z32, v32, 4.0), np_kd(z32, v32, 4.0)),
    (losses.dkd, (zh, vh, y, 1.0, 8.0, 4.0), (z32, v32, y, 1.0, 8.0, 4.0),
     np_dkd(z32, v32, y, 1.0, 8.0, 4.0)),
    (losses.cross_entropy, (zh, y), (z32, y), None),
  ]:
    got = jax.jit(fn)(*args)
    chex.assert_type(got, jnp.float32)
    chex.assert_trees_all_equal(got, jax.jit(fn)(*args32))  # cast at entry, nothing else
    if ref is not None:
      _assert_scalar_close(got, ref)


def test_eager_calls_under_jax_debug_nans_raise_no_false_alarm():
  """With jit disabled (debugging one's own loop), jax_debug_nans tripped on the NaN placeholder
  of out-of-range rows, `where(in_range, rows, nan)`, with every label valid."""
  z, v, y = (jnp.asarray(a) for a in _logits(8))
  with jax.disable_jit(), jax.debug_nans(True):
    for call in (lambda: losses.cross_entropy(z, y), lambda: sort_teacher_logits(v, y),
                 lambda: losses.dkd(z, v, y, 1.0, 8.0, 4.0)):
      assert np.isfinite(np.asarray(call())).all()


def test_python_numbers_keep_float32_losses_float32_under_jax_enable_x64():
  """Under x64 a Python temperature (or epoch) became a float64 array and promoted the loss."""
  z, v, y = (jnp.asarray(a) for a in _logits(8))
  calls = [(losses.kd, (z, v, 4.0)), (losses.dkd, (z, v, y, 1.0, 8.0, 4.0)),
           (losses.dkd_warmup_factor, (3, 20)), (losses.ctkd_temperature, (1.0,))]
  want = [fn(*args) for fn, args in calls]
  with jax.enable_x64(True):
    got = [fn(*args) for fn, args in calls]
  chex.assert_trees_all_equal(got, want)
  chex.assert_type(got, jnp.float32)


def test_temperature_may_be_traced_and_gets_gradients_from_both_sides():
  z, v, y = _logits(9, shape=(4, 20))
  t0, h = 3.0, 1e-4
  for fn, ref in [
    (lambda t: losses.kd(z, v, t), lambda t: np_kd(z, v, t)),
    (lambda t: losses.dkd(z, v, y, 1.0, 8.0, t), lambda t: np_dkd(z, v, y, 1.0, 8.0, t)),
  ]:
    value, grad = jax.jit(jax.value_and_grad(fn))(jnp.float32(t0))
    _assert_scalar_close(value, ref(t0))
    np.testing.assert_allclose(grad, (ref(t0 + h) - ref(t0 - h)) / (2 * h), rtol=1e-3)


def test_teacher_logits_get_no_gradient():
  z, v, y = _logits(10, shape=(4, 20))
  np.testing.assert_array_equal(jax.grad(losses.kd, argnums=1)(z, v, 4.0), 0.0)
  np.testing.assert_array_equal(jax.grad(losses.dkd, argnums=1)(z, v, y, 1.0, 8.0, 4.0), 0.0)


@pytest.mark.parametrize("t", [1.0, 4.0, 1e4])
def test_extreme_logits_give_finite_losses_and_gradients(t):
  k = 10
  z = np.zeros((4, k), np.float32)
  v = np.zeros((4, k), np.float32)
  z[0, 0], z[1, 1], z[2], z[3, 5] = 1e4, -1e4, np.linspace(-1e4, 1e4, k), 1e4
  v[0, 1], v[1, 1], v[2], v[3, 3] = 1e4, 1e4, np.linspace(1e4, -1e4, k), -1e4
  y = np.array([1, 1, 0, 3])  # student sure of a wrong class; teacher target logit far ahead

  def total(z, t):
    return (
      losses.kd(z, v, t)
      + losses.dkd(z, v, y, 1.0, 8.0, t)
      + losses.kd(losses.standardize(z), losses.standardize(v), t)
      + losses.cross_entropy(z, y)
    )

  value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(z, jnp.float32(t))
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_masked_teacher_classes_follow_the_0_log_0_convention():
  """A teacher logit of -inf (a masked class) has p = 0 and adds nothing, as in F.kl_div; the
  loss and its gradients (the student's, a learned temperature's) equal those of a mask of
  -1e30, whose probability underflows to 0. Both were NaN."""
  z, v, y = _logits(11, shape=(4, 10))
  masked = np.zeros_like(v, bool)
  masked[:, [3, 7]] = True
  masked[np.arange(4), y] = False
  for loss in (lambda z, v, t: losses.kd(z, v, t),
               lambda z, v, t: losses.dkd(z, v, y, 1.0, 8.0, t)):
    def value_and_grads(fill):
      return jax.value_and_grad(loss, argnums=(0, 2))(z, np.where(masked, fill, v), 4.0)
    inf_loss, inf_grads = value_and_grads(-np.inf)
    finite_loss, finite_grads = value_and_grads(-1e30)
    assert np.isfinite(inf_loss)
    np.testing.assert_allclose(inf_loss, finite_loss, rtol=1e-6)
    chex.assert_trees_all_close(inf_grads, finite_grads, rtol=1e-6)
  expected = np_kd(z, np.where(masked, -1e30, v), 4.0)
  _assert_scalar_close(losses.kd(z, np.where(masked, -np.inf, v), 4.0), expected)
  # DKD without Sort, the label's own class masked: the teacher's b_target is 0 (was NaN).
  masked[np.arange(4), y] = True
  inf_loss, inf_grads = jax.value_and_grad(losses.dkd, argnums=(0, 5))(
      z, np.where(masked, -np.inf, v), y, 1.0, 8.0, 4.0)
  finite_loss, finite_grads = jax.value_and_grad(losses.dkd, argnums=(0, 5))(
      z, np.where(masked, -1e30, v), y, 1.0, 8.0, 4.0)
  np.testing.assert_allclose(inf_loss, finite_loss, rtol=1e-6)
  chex.assert_trees_all_close(inf_grads, finite_grads, rtol=1e-6)
  # A NaN teacher logit (damaged weights) is no mask: the loss must not come out finite.
  damaged = np.where(masked, np.nan, v)
  assert np.isnan(losses.kd(z, damaged, 4.0)) and np.isnan(losses.dkd(z, damaged, y, 1, 8, 4))


def test_dkd_tckd_finite_where_the_reference_log_underflows():
  # The student's non-target probability (~3e-87) underflows in float32: the log of the masked
  # sum would be -inf (an infinite loss); the log-sum-exp form matches float64.
  z = np.array([[200.0, 0.0, 0.0]], np.float32)
  v = np.array([[0.0, 1.0, 2.0]], np.float32)
  y = np.array([0])
  _assert_scalar_close(losses.dkd(z, v, y, 1.0, 0.0, 1.0), np_dkd(z, v, y, 1.0, 0.0, 1.0))
  # The teacher's non-target mass (~1e-13) as a masked sum, not 1 - b_target (which rounds
  # to 0 or below in float32): TCKD ~3e-11, as in float64.
  v = np.array([[30.0, 0.0, 0.0]], np.float32)
  _assert_scalar_close(losses.dkd(z, v, y, 1.0, 0.0, 1.0), np_dkd(z, v, y, 1.0, 0.0, 1.0))


# ---------------------------------------------------------------- schedules and CTKD
def test_schedules():
  np.testing.assert_allclose(losses.dkd_warmup_factor(1, 20), 0.05, rtol=1e-6)
  np.testing.assert_allclose(losses.dkd_warmup_factor(10, 20), 0.5, rtol=1e-6)
  for epoch in (20, 240):
    np.testing.assert_array_equal(losses.dkd_warmup_factor(epoch, 20), 1.0)
  np.testing.assert_array_equal(losses.dkd_warmup_factor(1, 1), 1.0)

  lam1 = losses.ctkd_lambda(1, 10)
  np.testing.assert_allclose(lam1, (1 - math.cos(math.pi / 10)) / 2, rtol=1e-6)
  np.testing.assert_allclose(lam1, 0.0245, atol=1e-4)
  np.testing.assert_allclose(losses.ctkd_lambda(5, 10), 0.5, rtol=1e-6)
  np.testing.assert_allclose(losses.ctkd_lambda(1, 5), (1 - math.cos(math.pi / 5)) / 2, rtol=1e-6)
  for epoch in (10, 11, 240):
    np.testing.assert_allclose(losses.ctkd_lambda(epoch, 10), 1.0, rtol=1e-7)
  for ramp in (0, -3):  # would be 0/0 = NaN
    with pytest.raises(ValueError, match="ramp_epochs must be positive"):
      losses.ctkd_lambda(1, ramp)
    with pytest.raises(ValueError, match="ramp_epochs must be positive"):
      jax.jit(lambda e: losses.ctkd_lambda(e, ramp))(1)

  t0 = losses.ctkd_temperature(1.0)
  np.testing.assert_allclose(t0, 1.0 + 20.0 / (1.0 + math.exp(-1.0)), rtol=1e-6)
  np.testing.assert_allclose(t0, 15.6, atol=0.05)
  extremes = losses.ctkd_temperature(jnp.array([-50.0, 50.0]))
  np.testing.assert_allclose(extremes, [1.0, 21.0], rtol=1e-6)
  np.testing.assert_allclose(losses.ctkd_temperature(0.0, 2.0, 10.0), 7.0, rtol=1e-6)

  # Traced epochs under jit.
  jitted = jax.jit(lambda e: (losses.dkd_warmup_factor(e, 20), losses.ctkd_lambda(e, 10)))
  np.testing.assert_allclose(jitted(jnp.int32(5)), (0.25, 0.5), rtol=1e-6)


def test_reverse_gradient():
  x = jnp.asarray(np.random.default_rng(11).standard_normal((3, 4)), jnp.float32)
  w = jnp.arange(12.0).reshape(3, 4)
  chex.assert_trees_all_equal(losses.reverse_gradient(x, 0.7), x)

  def weighted(a, scale):
    return jnp.sum(w * losses.reverse_gradient(a, scale))

  gx, gs = jax.jit(jax.grad(weighted, argnums=(0, 1)))(x, jnp.float32(0.7))  # traced scale
  chex.assert_trees_all_close(gx, -0.7 * w, rtol=1e-6)
  chex.assert_trees_all_equal(gs, jnp.float32(0.0))
  xb = x.astype(jnp.bfloat16)
  gb = jax.grad(lambda a: jnp.sum(losses.reverse_gradient(a, 2.0).astype(jnp.float32)))(xb)
  chex.assert_type(gb, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(gb, np.float32), -2.0)


def test_ctkd_temperature_ascends_the_kd_loss():
  z, v, _ = _logits(12, shape=(4, 20))

  def kd_at(theta, lam):
    return losses.kd(z, v, losses.ctkd_temperature(losses.reverse_gradient(theta, lam)))

  lam = losses.ctkd_lambda(3, 10)
  reversed_grad = jax.grad(kd_at)(jnp.float32(1.0), lam)
  plain_grad = jax.grad(lambda th: losses.kd(z, v, losses.ctkd_temperature(th)))(jnp.float32(1.0))
  assert plain_grad != 0.0
  np.testing.assert_allclose(reversed_grad, -lam * plain_grad, rtol=1e-6)
