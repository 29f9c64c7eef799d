"""Tests of the Sort teacher-logit correction against an independent NumPy reference."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sortkd_jax import losses, sort_teacher_logits

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
_sort_jit = jax.jit(sort_teacher_logits)


def _bits(a) -> np.ndarray:
  """The raw bit patterns, so that -0.0 and 0.0 (and every other value) compare exactly."""
  a = np.asarray(a)
  return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _reference_row(row: np.ndarray, y: int) -> np.ndarray:
  """Sort from its definition (methods.md, steps 1-3), one row, ties by class index."""
  k = len(row)
  values = [float(a) for a in row]  # exact in float64 for every tested dtype; -0.0 == 0.0
  by_value = sorted(range(k), key=lambda i: (-values[i], i))  # stable descending ranking
  classes = [y] + [i for i in by_value if i != y]  # step 1: label first, then by value
  out = np.empty_like(row)
  for position, cls in enumerate(classes):
    out[cls] = row[by_value[position]]  # step 3: the bits of the position-th largest value
  return out


def reference_sort(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  flat_x = x.reshape(-1, x.shape[-1])
  flat_y = np.asarray(labels).reshape(-1)
  out = [_reference_row(r, int(y)) for r, y in zip(flat_x, flat_y)]
  return np.stack(out).reshape(x.shape)


# Values chosen to produce ties, signed zeros, subnormals, extremes and ordinary numbers.
_SPECIAL = st.sampled_from(
  [0.0, -0.0, 1.0, -1.0, 2.0, 3.5, 1e30, -1e30, 1e-30, 1e-45, -1e-45, 65504.0, -65504.0]
)
_VALUE = st.one_of(_SPECIAL, st.floats(-1e6, 1e6, width=32))


@st.composite
def rows_and_labels(draw, dtype=np.float32):
  shape = draw(st.sampled_from([(5,), (3, 4), (2, 2, 7), (1, 1)]))
  x = draw(hnp.arrays(np.float32, shape, elements=_VALUE))
  x = np.where(np.abs(x) <= float(jnp.finfo(dtype).max), x, 0.0).astype(dtype)  # no overflow
  labels = draw(hnp.arrays(np.int32, shape[:-1], elements=st.integers(0, shape[-1] - 1)))
  return x, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_matches_reference_bitwise(dtype, data):
  x, labels = data.draw(rows_and_labels(dtype))
  out = _sort_jit(jnp.asarray(x), jnp.asarray(labels))
  chex.assert_shape(out, x.shape)
  chex.assert_type(out, x.dtype)
  np.testing.assert_array_equal(_bits(out), _bits(reference_sort(x, labels)))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_properties(data):
  x, labels = data.draw(rows_and_labels())
  out = np.asarray(_sort_jit(jnp.asarray(x), jnp.asarray(labels)))
  flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])
  for row, new, y in zip(flat_x, flat_out, labels.reshape(-1)):
    # A permutation of the row's bit patterns.
    np.testing.assert_array_equal(np.sort(_bits(new)), np.sort(_bits(row)))
    # The label receives the row maximum.
    assert new[y] == row.max()
    # Non-label classes, taken in the stable descending order of the input, get
    # non-increasing values: their relative order is preserved.
    others = [i for i in sorted(range(len(row)), key=lambda i: (-row[i], i)) if i != y]
    assert np.all(np.diff(new[others].astype(np.float64)) <= 0)
  # Idempotent in value (a second pass may swap the signs of tied zeros, nothing else).
  again = np.asarray(_sort_jit(jnp.asarray(out), jnp.asarray(labels)))
  np.testing.assert_array_equal(again, out)


@settings(max_examples=30, deadline=None)
@given(
  x=hnp.arrays(np.float32, 6, elements=st.floats(-100, 100, width=32), unique=True),
  perm=st.permutations(range(6)),
  y=st.integers(0, 5),
)
def test_equivariant_under_class_permutation(x, perm, y):
  perm = np.asarray(perm)
  out = np.asarray(_sort_jit(jnp.asarray(x), jnp.asarray(y)))
  permuted = np.asarray(_sort_jit(jnp.asarray(x[perm]), jnp.asarray(int(np.argsort(perm)[y]))))
  np.testing.assert_array_equal(permuted, out[perm])
  # With distinct values the non-label order is strict.
  others = [i for i in np.argsort(-x, kind="stable") if i != y]
  assert np.all(np.diff(out[others]) < 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_identity_on_correct_rows_bitwise(dtype):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 9)).astype(dtype)
  x[0, 0] = [0.0, -0.0, 0.0, -1, -2, -0.0, -3, -4, -5]  # tied signed zeros at the maximum
  x[0, 1] = [2, 7, 7, 7, 1, 0, 7, 3, 3]  # tied maxima
  labels = np.argmax(x, axis=-1)  # first maximal class: stable rank 1
  out = _sort_jit(jnp.asarray(x), jnp.asarray(labels))
  np.testing.assert_array_equal(_bits(out), _bits(x))


def test_documented_examples():
  v = jnp.array([3.0, 5.0, 1.0, 4.0, 2.0])  # methods.md "Sort" (y=2), spec §8.4 (y=0, 1, 2)
  np.testing.assert_array_equal(sort_teacher_logits(v, jnp.array(2)), [2, 4, 5, 3, 1])
  np.testing.assert_array_equal(sort_teacher_logits(v, jnp.array(0)), [5, 4, 1, 3, 2])
  np.testing.assert_array_equal(sort_teacher_logits(v, jnp.array(1)), v)
  # Spec §8.4 tie example: the stable rule gives the lower value (4) to the higher-index
  # member (class 1) of the tied group {0, 1}.
  z = jnp.array([5.0, 5.0, 1.0, 4.0, 2.0])
  np.testing.assert_array_equal(sort_teacher_logits(z, jnp.array(3)), [5, 4, 1, 5, 2])
  # Label inside a tied maximum group, above and below it.
  np.testing.assert_array_equal(sort_teacher_logits(z, jnp.array(1)), z)
  np.testing.assert_array_equal(
    sort_teacher_logits(jnp.array([1.0, 4.0, 4.0, 4.0]), jnp.array(0)), [4, 4, 4, 1]
  )


def test_exact_where_the_reference_offset_fails():
  # Spec §8.4: with the reference's +1e9 key the label ties with 1e9 and nothing moves.
  z = jnp.array([1e9, 0.3, 5.0], jnp.float32)
  np.testing.assert_array_equal(sort_teacher_logits(z, jnp.array(2)), np.float32([5.0, 0.3, 1e9]))
  big = jnp.array([[1e30, -1e30, 3e38, -3e38, 0.0]], jnp.float32)
  np.testing.assert_array_equal(
    sort_teacher_logits(big, jnp.array([3])), np.float32([[0.0, -3e38, 1e30, 3e38, -1e30]])
  )
  # Subnormals are ordered exactly, not flushed to zero as in XLA:CPU float comparisons.
  tiny = np.float32([0.0, 1e-45, -1e-45, 3.5e-40, -0.0])
  out = sort_teacher_logits(jnp.asarray(tiny), jnp.array(2))
  expected = np.float32([-0.0, 0.0, 3.5e-40, 1e-45, -1e-45])
  np.testing.assert_array_equal(_bits(out), _bits(expected))


@pytest.mark.parametrize("shape", [(7,), (4, 7), (2, 3, 7)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dtype_shape_and_jit_equals_eager(shape, dtype):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.integers(-3, 4, shape).astype(dtype))  # many ties
  labels = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]))
  eager = sort_teacher_logits(x, labels)
  jitted = _sort_jit(x, labels)
  chex.assert_shape(jitted, shape)
  chex.assert_type(jitted, dtype)
  np.testing.assert_array_equal(_bits(jitted), _bits(eager))
  expected = reference_sort(np.asarray(x), np.asarray(labels))
  np.testing.assert_array_equal(_bits(jitted), _bits(expected))


@pytest.mark.parametrize("num_classes", [17, 100, 1000])
def test_ties_in_rows_of_real_widths_rank_by_class_index(num_classes):
  """XLA:CPU sorts rows of up to 16 elements stably even when asked for an unstable sort, so
  the tie order is checked on wider rows too (CIFAR-100's and ImageNet's class counts)."""
  rng = np.random.default_rng(2)
  x = rng.integers(-3, 4, (8, num_classes)).astype(np.float32)  # every value tied many times
  labels = rng.integers(0, num_classes, 8)
  out = _sort_jit(jnp.asarray(x), jnp.asarray(labels))
  np.testing.assert_array_equal(_bits(out), _bits(reference_sort(x, labels)))


def test_vmap_consistency():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.integers(-2, 3, (3, 5, 6)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 6, (3, 5)))
  whole = sort_teacher_logits(x, labels)
  np.testing.assert_array_equal(jax.vmap(sort_teacher_logits)(x, labels), whole)
  per_row = jax.vmap(jax.vmap(sort_teacher_logits))(x, labels)
  np.testing.assert_array_equal(per_row, whole)
  # vmap over a non-leading axis of the batch.
  swapped = jax.vmap(sort_teacher_logits, in_axes=(1, 1), out_axes=1)(x, labels)
  np.testing.assert_array_equal(swapped, whole)


def test_out_of_range_labels_give_rows_of_nan_under_jit():
  """Nothing can be raised there: a NaN row makes any loss of it NaN, KD's too, which reads no
  labels (an unchanged row gave KD+Sort a finite loss, the bad label unnoticed)."""
  x = jnp.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
  out = _sort_jit(x, jnp.array([-1, 3, 0]))
  np.testing.assert_array_equal(out, [[np.nan] * 3, [np.nan] * 3, [3, 2, 1]])
  kd_sort = jax.jit(lambda z, v, y: losses.kd(z, sort_teacher_logits(v, y), 4.0))
  assert np.isnan(kd_sort(x, x, jnp.array([0, 1, 3])))
  assert np.isfinite(kd_sort(x, x, jnp.array([0, 1, 2])))
  with jax.enable_x64(True):  # int64 labels, beyond int32: none of them is class 0
    out = _sort_jit(x, jnp.array([2**32, -2**32, 2**33 + 2], jnp.int64))
  assert np.all(np.isnan(out))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16])
def test_narrow_label_dtypes_with_more_classes_than_they_count(dtype):
  """uint8 labels of 300 classes: the range check must not wrap 300 into the labels' dtype (it
  did, and label 44 then counted as out of range, leaving its row unsorted)."""
  x = jnp.asarray(np.random.default_rng(0).permutation(70_000)[:2 * 300].reshape(2, 300),
                  jnp.float32)
  labels = np.array([44, 2], dtype)
  expected = _sort_jit(x, jnp.asarray(labels, jnp.int32))
  np.testing.assert_array_equal(_sort_jit(x, labels), expected)
  assert not np.array_equal(expected, x)


def test_commutes_with_temperature():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.permuted(np.tile(np.arange(10.0, dtype=np.float32), (4, 1)), axis=1))
  labels = jnp.asarray(rng.integers(0, 10, 4))
  scaled_first = sort_teacher_logits(x / 4.0, labels)
  np.testing.assert_array_equal(scaled_first, sort_teacher_logits(x, labels) / 4.0)


def test_no_gradient():
  x = jnp.array([[3.0, 5.0, 1.0, 4.0, 2.0]])
  grad = jax.grad(lambda a: jnp.sum(sort_teacher_logits(a, jnp.array([2])) * jnp.arange(5.0)))(x)
  np.testing.assert_array_equal(grad, jnp.zeros_like(x))


def test_rejects_bad_inputs():
  with pytest.raises(TypeError):
    sort_teacher_logits(jnp.arange(4), jnp.array(0))
  with pytest.raises(ValueError):
    sort_teacher_logits(jnp.zeros((2, 4)), jnp.array([0, 1, 2]))
