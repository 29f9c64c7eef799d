"""BatchNorm folding for frozen (eval-mode) networks: the teacher's fast path.

In eval mode a BatchNorm is a per-channel affine map, so when it directly follows a
convolution it can be moved into the convolution's kernel and bias:
w' = w·γ/√(σ²+ε), b' = β + (b − μ)·γ/√(σ²+ε). XLA then sees convolution + bias (+ residual)
(+ ReLU), which it can run as one fused cuDNN call instead of a convolution followed by a
separate pass over the activations. The logits change only by float rounding (ported
mdistiller models still match their reference logits); `config.teacher.fold_batchnorm=False`
keeps the BatchNorms.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sortkd_jax.models.layers import BatchNorm


class _Identity(nnx.Module):
  """What a folded BatchNorm becomes."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


@contextlib.contextmanager
def _intercepted(before: Callable = lambda module, x: x,
                 after: Callable = lambda module, x, y: y):
  """Runs `before(module, input)` and `after(module, input, output)` around every Conv and
  BatchNorm call; their results replace the input and output."""
  originals = {cls: cls.__call__ for cls in (nnx.Conv, BatchNorm)}

  def wrapped(original):
    def call(self, x, *args, **kwargs):
      return after(self, x, original(self, before(self, x), *args, **kwargs))
    return call

  try:
    for cls, original in originals.items():
      cls.__call__ = wrapped(original)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def conv_batchnorm_pairs(model: nnx.Module, image_shape: tuple[int, ...]
                         ) -> list[tuple[nnx.Conv, BatchNorm]]:
  """(conv, bn) pairs of an eval-mode `model` where the BatchNorm is called once, on that conv's
  output, and nothing else reads that output (e.g. a pre-activation residual would).

  Found from one traced forward pass, with nothing compiled: every conv output and BatchNorm
  input goes through a marker (an identity, `lax.optimization_barrier`), and in the traced
  program a foldable conv's marked output has one reader, its BatchNorm's marker. (The traced
  program's classes are JAX internals, imported here only: if a JAX moves them, folding fails
  and a teacher runs unfolded, `teachers.load_teacher`.)
  """
  from jax.extend.core import Literal  # noqa: PLC0415

  markers: list = []  # the module of each marker, in trace order

  def mark(module, x):
    markers.append(module)
    return jax.lax.optimization_barrier(x)

  with _intercepted(before=lambda m, x: mark(m, x) if isinstance(m, BatchNorm) else x,
                    after=lambda m, x, y: mark(m, y) if isinstance(m, nnx.Conv) else y):
    jaxpr = jax.make_jaxpr(model)(
        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)).jaxpr
  marks = [e for e in jaxpr.eqns if e.primitive is jax.lax.optimization_barrier_p]
  if len(marks) != len(markers):  # a model that traces its layers inside a nested program
    raise NotImplementedError(f"Cannot find the conv/BatchNorm pairs of {type(model).__name__}"
                              ": run it unfolded (--config.teacher.fold_batchnorm=False).")
  readers = collections.Counter(v for e in jaxpr.eqns for v in e.invars
                                if not isinstance(v, Literal))
  readers.update(v for v in jaxpr.outvars if not isinstance(v, Literal))
  times_called = collections.Counter(id(module) for module in markers)
  conv_of_output = {e.outvars[0]: module for module, e in zip(markers, marks)
                    if isinstance(module, nnx.Conv)}
  pairs = []
  for module, e in zip(markers, marks):
    conv = conv_of_output.get(e.invars[0])
    if (isinstance(module, BatchNorm) and conv is not None and readers[e.invars[0]] == 1
        and times_called[id(module)] == 1 and times_called[id(conv)] == 1):
      pairs.append((conv, module))
  return pairs


def _f64(variable: nnx.Variable) -> np.ndarray:
  return np.asarray(variable[...], np.float64)


def fold_batchnorm(model: nnx.Module, image_shape: tuple[int, ...]) -> int:
  """Folds, in place, every eval-mode BatchNorm that directly follows a convolution into it;
  returns how many were folded. `image_shape` is one input image's (H, W, C). Raises, with
  the model unchanged, where the pairs or their places cannot be found."""
  model.eval()
  parents = {}  # id(child module) -> (parent, attribute name or list index)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      children = enumerate(node) if isinstance(node, nnx.List) else vars(node).items()
      for key, child in children:
        parents.setdefault(id(child), (node, key))
  pairs = [(conv, bn, *parents[id(bn)]) for conv, bn in conv_batchnorm_pairs(model, image_shape)]
  for conv, bn, parent, key in pairs:  # in float64 NumPy: exact to float32, no device op
    inv = _f64(bn.scale) / np.sqrt(_f64(bn.var) + bn.epsilon)
    bias = _f64(bn.bias) + ((_f64(conv.bias) if conv.use_bias else 0.0) - _f64(bn.mean)) * inv
    dtype = conv.kernel[...].dtype
    conv.kernel[...] = jax.device_put((_f64(conv.kernel) * inv).astype(dtype))
    conv.bias = nnx.Param(jax.device_put(bias.astype(dtype)))
    conv.use_bias = True
    if isinstance(parent, nnx.List):
      parent[key] = _Identity()
    else:
      setattr(parent, key, _Identity())
  return len(pairs)
