"""The Sort correction of teacher logits (Limantoro, IEEE SPL 2025, arXiv 2508.16544).

Definition (docs/methods.md, "Sort"): order the classes as the label ``y`` first, then every other
class by descending teacher logit; order the values descending, v(1) >= ... >= v(K); the class at
position j receives v(j). Closed form, with r the rank of ``y``: ``y`` receives the maximum v(1),
the classes ranked above ``y`` each move down one value, the classes ranked below keep their own
logit, and a row whose teacher is already right comes back unchanged.
"""

import jax
import jax.numpy as jnp
from jax import lax

from sortkd_jax.losses import out_of_range_as_nan, target_index

__all__ = ["sort_teacher_logits"]

_INT_OF_WIDTH = {1: jnp.int8, 2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def _order_key(x: jax.Array) -> jax.Array:
  """Integers ordered exactly like the floats ``x``, with -0.0 and 0.0 equal.

  IEEE floats are sign-magnitude, so negating the magnitude bits of negative values gives two's
  complement integers in value order; both zeros map to 0 and no negation overflows. Comparing
  these instead of the floats keeps subnormals distinct from zero: XLA:CPU compares floats with
  subnormals flushed to zero, so a float sort would tie them with 0 on CPU and not on GPU.
  Integer keys also sort faster than floats on XLA:CPU.
  """
  int_type = _INT_OF_WIDTH[x.dtype.itemsize]
  bits = lax.bitcast_convert_type(x, int_type)
  magnitude = bits & jnp.iinfo(int_type).max
  return jnp.where(bits < 0, -magnitude, bits)


def sort_teacher_logits(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> jax.Array:
  """Sort teacher logits: the label takes the row maximum, the classes above it shift down.

  Args:
    logits: teacher logits ``[..., K]``, any floating dtype (float32, bfloat16, float16, ...).
    labels: integer labels with shape ``logits.shape[:-1]``.

  Returns:
    An array of the same shape and dtype whose every row is a permutation of the input row's
    values: the bits are only moved, never recomputed or upcast. Rows where the label already
    holds the maximum (rank 1 under the tie rule below) are returned bit for bit. Labels
    outside ``[0, K)`` raise; under ``jit`` or ``vmap``, where nothing can be raised, their rows
    come back as NaN, so that any loss of them (KD's too, which reads no labels) is NaN.

  Ranking and ties: classes are ranked by one stable descending sort of exact integer keys
  (``_order_key``), so equal logits (and ``-0.0 == 0.0``) keep class-index order; the
  highest-index member of a tied group above the label is the one that receives the next lower
  value. This is deliberately different from the
  reference code (docs/mdistiller_spec.md §8.4), which adds 1e9 to the label's logit and uses an
  unstable ``torch.sort``: the offset is inexact in float32 once logits approach 1e9, and the tie
  order of an unstable sort is implementation-defined. Here the result is exact for any finite
  logits and the same on every backend.

  Sort only permutes values within a row, so it commutes with any per-row strictly increasing
  map that creates no new ties (a positive temperature, LSKD's z-score): callers may apply it to
  raw teacher logits, before temperature scaling or standardisation.

  The teacher logits carry no gradient in Sort-KD (they come from a frozen teacher and Sort is
  piecewise a permutation), so the output is wrapped in ``lax.stop_gradient``: differentiating
  through this function yields zeros, and no backward pass through the sort is ever traced.
  """
  x = jnp.asarray(logits)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"logits must be floating point, got {x.dtype}")
  index, in_range = target_index(x, labels)
  axis = x.ndim - 1

  # order[..., j]: the class at stable descending rank j; ranked: its value, bits moved as-is.
  iota = lax.broadcasted_iota(jnp.int32, x.shape, axis)  # class indices, later ranks
  _, order = lax.sort((-_order_key(x), iota), dimension=axis, is_stable=True, num_keys=1)
  ranked = jnp.take_along_axis(x, order, axis=axis)
  # r = rank of the label; an out-of-range (traced) label gets r = 0, then a row of NaN.
  r = jnp.where(in_range[..., None],
                jnp.argmax(order == index[..., None], axis=axis, keepdims=True), 0)
  # In rank order: ranks above r take the next value down, rank r the maximum, the rest stay.
  next_down = jnp.concatenate([ranked[..., 1:], ranked[..., -1:]], axis=axis)
  rotated = jnp.where(iota < r, next_down, jnp.where(iota == r, ranked[..., :1], ranked))
  # Scatter back to class order (on XLA:CPU faster than a second sort or an inverse-perm gather).
  out = jnp.put_along_axis(jnp.zeros_like(x), order, rotated, axis=axis, inplace=False)
  return lax.stop_gradient(out_of_range_as_nan(out, in_range[..., None]))
