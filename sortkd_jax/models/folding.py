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

  One traced forward pass finds which BatchNorm takes which conv's output. Whether anything
  else reads it is found by differentiation: each candidate conv's output gets a zero offset
  δ that its BatchNorm subtracts again, so the logits depend on δ only through other readers.
  """
  calls: list = []
  with _intercepted(after=lambda module, x, y: calls.append((module, x, y)) or y):
    jax.eval_shape(model, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  times_called = collections.Counter(id(module) for module, _, _ in calls)
  conv_of_output = {id(y): module for module, _, y in calls if isinstance(module, nnx.Conv)}
  candidates = []
  for module, x, _ in calls:
    conv = conv_of_output.get(id(x))
    if (isinstance(module, BatchNorm) and conv is not None
        and times_called[id(module)] == 1 and times_called[id(conv)] == 1):
      candidates.append((conv, module))
  slot = {id(m): i for i, pair in enumerate(candidates) for m in pair}

  def projected_logits(offsets, images, projection):
    def add_offset(module, x, y):
      return y + offsets[slot[id(module)]] if isinstance(module, nnx.Conv) else y

    def remove_offset(module, x):
      return x - offsets[slot[id(module)]] if isinstance(module, BatchNorm) else x

    with _intercepted(before=lambda m, x: remove_offset(m, x) if id(m) in slot else x,
                      after=lambda m, x, y: add_offset(m, x, y) if id(m) in slot else y):
      return jnp.sum(model(images) * projection)

  image_key, projection_key = jax.random.split(jax.random.PRNGKey(0))
  images = jax.random.normal(image_key, (2, *image_shape))
  projection = jax.random.normal(projection_key, jax.eval_shape(model, images).shape)
  offsets = [jnp.zeros((bn.num_features,)) for _, bn in candidates]
  grads = jax.jit(jax.grad(projected_logits))(offsets, images, projection)
  return [pair for pair, g in zip(candidates, grads) if not jnp.any(g != 0)]


def fold_batchnorm(model: nnx.Module, image_shape: tuple[int, ...]) -> int:
  """Folds, in place, every eval-mode BatchNorm that directly follows a convolution into it;
  returns how many were folded. `image_shape` is one input image's (H, W, C)."""
  model.eval()
  pairs = conv_batchnorm_pairs(model, image_shape)
  parents = {}  # id(child module) -> (parent, attribute name or list index)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      children = enumerate(node) if isinstance(node, nnx.List) else vars(node).items()
      for key, child in children:
        parents.setdefault(id(child), (node, key))
  for conv, bn in pairs:
    inv = jax.lax.rsqrt(bn.var[...] + bn.epsilon) * bn.scale[...]
    bias = bn.bias[...] + ((conv.bias[...] if conv.use_bias else 0.0) - bn.mean[...]) * inv
    conv.kernel[...] = conv.kernel[...] * inv.astype(conv.kernel[...].dtype)
    conv.bias = nnx.Param(bias.astype(conv.kernel[...].dtype))
    conv.use_bias = True
    parent, key = parents[id(bn)]
    if isinstance(parent, nnx.List):
      parent[key] = _Identity()
    else:
      setattr(parent, key, _Identity())
  return len(pairs)
