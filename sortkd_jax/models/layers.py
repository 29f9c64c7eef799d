"""Building blocks shared by the mdistiller model zoo (spec §1), in Flax NNX, NHWC.

Everything here reproduces PyTorch semantics exactly enough that ported weights give
PyTorch's logits (the fixtures agree to max|Δ|/max|ref| of 3e-7 to 1.6e-5) and that training
from scratch starts from the same distributions as the reference:

* ``BatchNorm``: torch ``BatchNorm2d`` (eps 1e-5, momentum 0.1 in torch terms), storing
  torch's own ``running_mean``/``running_var`` (unbiased) so porting copies them verbatim.
* ``conv`` / ``classifier``: ``nnx.Conv`` / ``nnx.Linear`` with explicit symmetric padding
  (never ``'SAME'``, spec §1 "Padding") and the per-family initialisers of the spec's
  init table.
* pooling and channel shuffle helpers with torch's padding conventions.

Module attribute paths mirror torch state-dict keys (see ``sortkd_jax.porting``), so a
torch ``nn.Sequential`` with parameter-free entries (ReLU, pools) becomes an ``nnx.List``
holding ``None`` at those indices: the state path ``('conv', 3, 'kernel')`` is then
``conv.3.weight``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any
Initializer = Callable[..., jax.Array]

# --------------------------------------------------------------------------------------
# Initialisers (spec §1 init table). Flax kernels are [kh, kw, in/groups, out] for convs
# and [in, out] for linears; torch's fans are fan_in = in/groups·k², fan_out = out·k².
# --------------------------------------------------------------------------------------


def _fans(shape: Sequence[int]) -> tuple[int, int]:
  receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
  return shape[-2] * receptive, shape[-1] * receptive


def _draw(key: jax.Array, shape: Sequence[int], kind: str, scale: float, dtype) -> jax.Array:
  """``normal·scale`` or ``(2u−1)·scale`` of ``shape``, from a flat draw of a power-of-two
  size.

  Drawing per-shape compiles one XLA program per distinct parameter shape (≈50 for
  MobileNetV2, seconds on a small CPU); power-of-two buckets need ~15 programs for the
  whole zoo, and outside tracing the slicing and scaling run in NumPy (no compile).
  Traced (``nnx.eval_shape``/``jit``) and eager construction give the same values.
  """
  n = math.prod(shape)
  bucket = max(1024, 1 << (n - 1).bit_length())
  if kind == "normal":
    flat = jax.random.normal(key, (bucket,), jnp.float32)
  else:
    flat = jax.random.uniform(key, (bucket,), jnp.float32)
  xp = jnp if isinstance(flat, jax.core.Tracer) else np
  u = xp.asarray(flat)[:n].reshape(tuple(shape))
  out = u * np.float32(scale) if kind == "normal" else (u * 2 - 1) * np.float32(scale)
  return jnp.asarray(out, dtype)


def normal_fan_out() -> Initializer:
  """normal(0, √(2/(k²·out))): torch ``kaiming_normal_(mode='fan_out', relu)`` and the
  ``normal_(0, sqrt(2/n))`` loops of WRN/VGG/MobileNetV2/ImageNet ResNet (untruncated)."""

  def init(key, shape, dtype=jnp.float32):
    _, fan_out = _fans(shape)
    return _draw(key, shape, "normal", math.sqrt(2.0 / fan_out), dtype)

  return init


def normal(std: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return _draw(key, shape, "normal", std, dtype)

  return init


def torch_default_kernel() -> Initializer:
  """PyTorch's default Conv/Linear weight init, kaiming_uniform(a=√5) ≡ U(±1/√fan_in)."""

  def init(key, shape, dtype=jnp.float32):
    fan_in, _ = _fans(shape)
    return _draw(key, shape, "uniform", 1.0 / math.sqrt(fan_in), dtype)

  return init


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch's default bias init U(±1/√fan_in) (the bias alone does not know fan_in)."""

  def init(key, shape, dtype=jnp.float32):
    return _draw(key, shape, "uniform", 1.0 / math.sqrt(fan_in), dtype)

  return init


def zeros(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
  del key
  return jnp.asarray(np.zeros(shape, np.float32), dtype)


def model_input(x: jax.Array, dtype: Dtype) -> jax.Array:
  """A model's images, checked and cast to its compute dtype: NHWC floats [B, H, W, 3],
  normalised. PyTorch's NCHW would fail deep inside XLA, and raw uint8 pixels run silently."""
  x = jnp.asarray(x)
  if x.ndim != 4 or x.shape[-1] != 3:
    nchw = x.ndim == 4 and x.shape[1] == 3
    raise ValueError(f"models take NHWC images [batch, height, width, 3], got shape {x.shape}"
                     + (": PyTorch's NCHW? x.transpose(0, 2, 3, 1)" if nchw else ""))
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"models take normalised float images, got {x.dtype} (for uint8 pixels: "
                    "sortkd_jax.augment.normalize)")
  return x.astype(dtype)


# --------------------------------------------------------------------------------------
# Conv / Linear factories.
# --------------------------------------------------------------------------------------


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    *,
    groups: int = 1,
    bias: bool = False,
    kernel_init: Initializer,
    bias_init: Initializer | None = None,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
) -> nnx.Conv:
  """A torch ``Conv2d`` as ``nnx.Conv``: symmetric padding ``kernel // 2``, as every model of
  the zoo (spec §1: 3×3 pads 1, 1×1 pads 0, 7×7 pads 3), ``groups`` → ``feature_group_count``."""
  p = kernel // 2
  if bias and bias_init is None:
    bias_init = torch_default_bias(in_ch // groups * kernel * kernel)
  return nnx.Conv(
      in_ch,
      out_ch,
      (kernel, kernel),
      (stride, stride),
      padding=((p, p), (p, p)),
      feature_group_count=groups,
      use_bias=bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      bias_init=bias_init if bias else zeros,
      rngs=rngs,
  )


def classifier(
    in_f: int,
    out_f: int,
    *,
    kernel_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    rngs: nnx.Rngs,
) -> nnx.Linear:
  """A model's last layer, a torch ``Linear`` (with bias; defaults are torch's U(±1/√in) for
  weight and bias), computed in float32 whatever the model's dtype: bf16 logits carry 8 bits,
  so a row's logits often tie (ties then decide the order Sort and top-k read), and the bias
  gradient would be summed over the batch in bf16. The matmul is a tiny share of a step."""
  return nnx.Linear(
      in_f,
      out_f,
      use_bias=True,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=kernel_init or torch_default_kernel(),
      bias_init=bias_init or torch_default_bias(in_f),
      rngs=rngs,
  )


# --------------------------------------------------------------------------------------
# BatchNorm with PyTorch semantics.
# --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     dtype: Dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Train-mode BatchNorm over all axes but the last: (output in `dtype`, batch mean, biased
  batch variance), the statistics in float32.

  The statistics come from one pass over the activations: per channel, the sums of x − s and
  of its square, two reductions of the same input that XLA can fuse (the two-pass form's
  second reduction waits for the first's result). The shift s is the channel's first value in
  the batch: the variance's float32 rounding error grows with ((mean − s)/std)², a few units
  for a value drawn from the batch, whereas the unshifted E[x²] − E[x]² loses the variance of
  channels whose mean is large against their std.

  The gradient is the closed-form one that cuDNN and PyTorch use, with two per-channel sums of
  the output gradient; autodiff of the forward would differentiate through the mean and the
  variance with several more reductions, each a kernel and a pass over the activations on a
  GPU. Mathematically the same gradient.
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon, dtype)[0]


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
  """One multiply-add per element, evaluated in float32 inside the elementwise fusion (no extra
  memory traffic) and rounded once to the compute dtype: a bf16 multiply-add would cancel
  catastrophically for channels whose mean is large against their std."""
  inv = jax.lax.rsqrt(var + epsilon) * scale
  return (x.astype(jnp.float32) * inv + (bias - mean * inv)).astype(dtype)


def _batch_norm_train_fwd(x, scale, bias, epsilon, dtype):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  shift = xf[(0,) * len(axes)]
  shifted = xf - shift
  offset = jnp.mean(shifted, axis=axes)
  mean = shift + offset
  var = jnp.maximum(jnp.mean(jnp.square(shifted), axis=axes) - jnp.square(offset), 0.0)
  y = _normalize(x, mean, var, scale, bias, epsilon, dtype)
  return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


def _batch_norm_train_bwd(epsilon, dtype, residuals, cotangents):
  del epsilon, dtype
  x, mean, inv_std, scale = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[a] for a in axes)
  g = dy.astype(jnp.float32)
  centred = x.astype(jnp.float32) - mean
  x_hat = centred * inv_std
  sum_g = jnp.sum(g, axis=axes)
  sum_g_x_hat = jnp.sum(g * x_hat, axis=axes)
  # d/dx of y, plus the (usually zero) gradients that reach the returned mean and variance.
  dx = (scale * inv_std) * (g - (sum_g + x_hat * sum_g_x_hat) / n)
  dx = dx + dmean / n + centred * (2.0 * dvar / n)
  return dx.astype(x.dtype), sum_g_x_hat, sum_g


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nnx.Module):
  """``torch.nn.BatchNorm2d`` over NHWC inputs (spec §1 "BatchNorm").

  Train mode (``use_running_average=False``): normalise with the batch mean and the
  *biased* batch variance over (N, H, W); then ``running ← (1−m)·running + m·stat`` with
  m = 0.1 and the *unbiased* variance (n/(n−1)), exactly torch's buffers. Eval mode: use
  the running statistics. ``model.train()`` / ``model.eval()`` (``set_attributes``) and
  ``nnx.view(model, use_running_average=...)`` (``set_view``) switch the mode.

  Statistics are computed in float32 whatever the compute ``dtype``, in one shifted pass
  (``batch_norm_train``); the running stats are ``nnx.BatchStat`` in float32. Reductions use
  plain ``jnp`` ops without ``axis_name``: under ``jax.jit`` with the batch sharded over a
  mesh, XLA computes them over the global batch.

  ``stat_updates`` = 2 reproduces WRN's double running-stat update (spec §2.3 quirk: the
  ``preact_feats`` BN calls run the same layer again on the same tensor in training), i.e.
  the update is applied twice: running ← 0.81·running + 0.19·stat.

  The train-mode gradient is the closed form of ``batch_norm_train`` (torch's), not autodiff's.
  """

  def __init__(
      self,
      num_features: int,
      *,
      momentum: float = 0.1,
      epsilon: float = 1e-5,
      stat_updates: int = 1,
      use_running_average: bool = False,
      dtype: Dtype = jnp.float32,
  ):
    self.num_features = num_features
    self.momentum = momentum
    self.epsilon = epsilon
    self.stat_updates = stat_updates
    self.use_running_average = use_running_average
    self.dtype = dtype
    ones, zeros_ = np.ones(num_features, np.float32), np.zeros(num_features, np.float32)
    self.scale = nnx.Param(jnp.asarray(ones))
    self.bias = nnx.Param(jnp.asarray(zeros_))
    self.mean = nnx.BatchStat(jnp.asarray(zeros_))
    self.var = nnx.BatchStat(jnp.asarray(ones))

  def set_view(self, use_running_average: bool | None = None):
    """Hook for ``nnx.view``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.use_running_average:
      return _normalize(x, self.mean[...], self.var[...], self.scale[...], self.bias[...],
                        self.epsilon, self.dtype)
    y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon, self.dtype)
    n = math.prod(x.shape[:-1])
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    r_mean, r_var = self.mean[...], self.var[...]
    bm, bv = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(unbiased)
    for _ in range(self.stat_updates):
      r_mean = (1.0 - m) * r_mean + m * bm
      r_var = (1.0 - m) * r_var + m * bv
    self.mean[...] = r_mean
    self.var[...] = r_var
    return y


# --------------------------------------------------------------------------------------
# Parameter-free ops (NHWC).
# --------------------------------------------------------------------------------------

relu = jax.nn.relu


def _check_poolable(x: jax.Array, kernel: int, padding: int) -> None:
  """A feature map smaller than the pooling window (images too small for the architecture)
  pooled to nothing: a traceback further on, or a mean over nothing, a NaN loss."""
  height, width = x.shape[1] + 2 * padding, x.shape[2] + 2 * padding
  if min(height, width) < kernel:
    raise ValueError(
        f"A {x.shape[1]}×{x.shape[2]} feature map is smaller than its {kernel}×{kernel} pooling "
        "window: the images are too small for this architecture (in a run, "
        "config.data.image_size); use larger ones, e.g. its native size.")


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
  """torch ``MaxPool2d``: padding never wins (−∞)."""
  _check_poolable(x, kernel, padding)
  p = padding
  return jax.lax.reduce_window(
      x, np.array(-np.inf, x.dtype), jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1),
      ((0, 0), (p, p), (p, p), (0, 0)))


def avg_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
  """torch ``AvgPool2d`` with ``count_include_pad=True``: always divide by kernel²."""
  _check_poolable(x, kernel, padding)
  p = padding
  # The init value must be a concrete 0 so that JAX lowers this to reduce_window_sum,
  # which (unlike a generic reduce_window) is differentiable.
  s = jax.lax.reduce_window(
      x, np.array(0, x.dtype), jax.lax.add, (1, kernel, kernel, 1),
      (1, stride, stride, 1), ((0, 0), (p, p), (p, p), (0, 0)))
  return s / jnp.asarray(kernel * kernel, x.dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] → [B, C]. Every head pool of the zoo reduces to 1×1 at its native
  input size (spec §9, item 3), where this equals the fixed-kernel torch pool."""
  _check_poolable(x, 1, 0)
  return jnp.mean(x, axis=(1, 2))


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet channel shuffle in NHWC (spec §1): output channel i·g + j ← input
  channel j·(C/g) + i. A reshape/transpose of the last axis only."""
  if groups == 1:
    return x
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  x = jnp.swapaxes(x, -1, -2)
  return x.reshape(*lead, c)
