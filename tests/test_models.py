"""The model zoo: structure equals mdistiller's state dicts, parameter counts, init, and
PyTorch BatchNorm semantics (spec §1, §2.3 quirk, §4)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sortkd_jax import models, porting
from sortkd_jax.models import layers as L

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "porting")
with open(os.path.join(FIXTURES, "mdistiller_state_dict_keys.json")) as _f:
  SPEC_KEYS = json.load(_f)

# Spec §4, trainable parameters.
PARAM_COUNTS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756,
    "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "wrn_16_1": 180_916,
    "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156, "vgg8": 3_965_028,
    "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "MobileNetV2": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528,
    "ResNet50": 23_705_252, "ResNet18": 11_220_132, "imagenet_ResNet18": 11_689_512,
    "imagenet_ResNet34": 21_797_672, "imagenet_ResNet50": 25_557_032,
    "imagenet_MobileNetV1": 4_231_976,
}


@nnx.jit
def forward(model, x):
  """Jitted forward; in train mode the updated BN statistics are written back."""
  return model(x)


def abstract(name, num_classes=None):
  return nnx.eval_shape(lambda: models.create_model(name, num_classes, rngs=nnx.Rngs(0)))


def test_registry_names_are_the_spec_models():
  assert tuple(SPEC_KEYS) == models.MODEL_NAMES
  assert set(PARAM_COUNTS) == set(models.MODEL_NAMES)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_state_paths_are_the_torch_keys(name):
  """Every NNX variable path translates to exactly one torch key of the JSON, with the
  torch-layout shape, and nothing else lives in the model's state."""
  model = abstract(name)
  _, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  assert not jax.tree.leaves(rest), f"unexpected non-Param/BatchStat state: {rest}"
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((params, stats)))
  expected = {k: tuple(s) for k, s in SPEC_KEYS[name] if not k.endswith("num_batches_tracked")}
  got = porting.torch_key_shapes(model)
  assert len(got) == len(expected)
  assert set(got) == set(expected), (sorted(set(got) - set(expected)),
                                     sorted(set(expected) - set(got)))
  assert got == expected
  assert models.count_params(model) == PARAM_COUNTS[name]


def test_images_too_small_for_an_architecture_are_named_so():
  """vgg8 on 4-pixel images pooled a 1×1 map to nothing: an IndexError traceback in a
  BatchNorm further on."""
  model = models.create_model("vgg8", 10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="A 1×1 feature map is smaller than its 2×2 pooling "
                     "window: the images are too small for this architecture"):
    model(jnp.zeros((2, 4, 4, 3)))
  assert model(jnp.zeros((2, 8, 8, 3))).shape == (2, 10)  # the smallest that pools to 1×1


def test_create_model_contract():
  with pytest.raises(ValueError, match=r"Unknown model name 'resnet9'\. Valid names: resnet8, "
                     ".*imagenet_MobileNetV1"):
    models.create_model("resnet9", rngs=nnx.Rngs(0))
  for typed, meant in (("mobilenetv2", "MobileNetV2"), ("wrn40_2", "wrn_40_2"),
                       ("ImageNet-ResNet18", "imagenet_ResNet18")):  # as spelt elsewhere
    with pytest.raises(ValueError, match=f"Unknown model name '{typed}' \\(did you mean "
                       f"'{meant}'\\?\\)\\. Valid names: resnet8, "):
      models.check_name(typed)
  for bad in (0, 10.0, True):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
      models.create_model("resnet8", bad, rngs=nnx.Rngs(0))
  for name in models.MODEL_NAMES:  # mdistiller's data: CIFAR-100 at 32 px, ImageNet at 224
    imagenet = name.startswith("imagenet_")
    assert models.default_num_classes(name) == (1000 if imagenet else 100), name
    assert models.native_image_size(name) == (224 if imagenet else 32), name
  m = models.create_model("resnet8", 10, rngs=nnx.Rngs(0))
  out = forward(m, jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, 10) and out.dtype == jnp.float32
  assert porting.torch_key_shapes(abstract("imagenet_MobileNetV1", 7))["fc.weight"] == (7, 1024)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1",
                                  "ShuffleV2", "ResNet18", "imagenet_ResNet18",
                                  "imagenet_MobileNetV1"])  # every family's forward
def test_images_must_be_nhwc_floats(name):
  """PyTorch's NCHW failed deep inside XLA's convolution; uint8 pixels ran unnormalised."""
  graphdef, state = nnx.split(abstract(name))
  apply = lambda x: jax.eval_shape(  # noqa: E731  shapes only, nothing runs
      lambda state, x: nnx.merge(graphdef, state)(x), state, x)
  assert apply(jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)).ndim == 2
  for shape, message in (((2, 3, 32, 32), r"\(2, 3, 32, 32\): PyTorch's NCHW\? x.transpose"),
                         ((32, 32, 3), r"NHWC images \[batch, height, width, 3\], got shape")):
    with pytest.raises(ValueError, match=message):
      apply(jax.ShapeDtypeStruct(shape, jnp.float32))
  with pytest.raises(TypeError, match="normalised float images, got uint8"):
    apply(jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8))


def test_bf16_compute_keeps_float32_params_stats_and_logits():
  m = models.create_model("resnet8", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  out = forward(m, x)  # train mode: updates the running statistics
  assert out.dtype == jnp.float32 and out.shape == (4, 100)
  _, params, stats = nnx.split(m, nnx.Param, nnx.BatchStat)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((params, stats)))
  assert np.isfinite(np.asarray(out)).all()
  # Same weights in float32: bf16 compute stays close.
  m32 = models.create_model("resnet8", rngs=nnx.Rngs(0))
  ref = forward(m32, x)
  out, ref = np.asarray(out), np.asarray(ref)
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 0.05
  for a, b in zip(jax.tree.leaves(nnx.state(m, nnx.BatchStat)),
                  jax.tree.leaves(nnx.state(m32, nnx.BatchStat))):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02)


def test_bf16_models_compute_their_classifier_in_float32():
  """bf16 logits carry 8 bits, which tie most rows' largest logits: the order Sort and top-k
  read."""
  for name in models.MODEL_NAMES:
    m = nnx.eval_shape(lambda: models.create_model(name, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    linears = [node for _, node in nnx.iter_graph(m) if isinstance(node, nnx.Linear)]
    assert [layer.dtype for layer in linears] == [jnp.float32], name
  m = models.create_model("resnet8", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
  out = np.asarray(forward(m, x))
  assert np.mean(out != out.astype(jnp.bfloat16).astype(np.float32)) > 0.9


# --------------------------------------------------------------------------------------
# BatchNorm: PyTorch semantics.
# --------------------------------------------------------------------------------------


def _np_bn_train(x, gamma, beta, rm, rv, momentum=0.1, eps=1e-5, updates=1):
  x = x.astype(np.float64)
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  n = x.shape[0] * x.shape[1] * x.shape[2]
  y = (x - mean) / np.sqrt(var + eps) * gamma + beta
  for _ in range(updates):
    rm = (1 - momentum) * rm + momentum * mean
    rv = (1 - momentum) * rv + momentum * var * n / (n - 1)
  return y, rm, rv


def _bn_with_stats(c, rng, dtype=jnp.float32, updates=1):
  bn = L.BatchNorm(c, dtype=dtype, stat_updates=updates)
  gamma, beta = rng.uniform(0.5, 1.5, c), rng.uniform(-0.3, 0.3, c)
  rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
  bn.scale[...] = jnp.asarray(gamma, jnp.float32)
  bn.bias[...] = jnp.asarray(beta, jnp.float32)
  bn.mean[...] = jnp.asarray(rm, jnp.float32)
  bn.var[...] = jnp.asarray(rv, jnp.float32)
  return bn, gamma, beta, rm, rv


@pytest.mark.parametrize("updates", [1, 2])
def test_batchnorm_train_eval_match_numpy(updates):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(6, 5, 4, 8)) * 3 + 2).astype(np.float32)
  bn, gamma, beta, rm, rv = _bn_with_stats(8, rng, updates=updates)
  y = bn(jnp.asarray(x))
  ry, rrm, rrv = _np_bn_train(x, gamma, beta, rm, rv, updates=updates)
  np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], rrm, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], rrv, rtol=1e-5, atol=1e-6)
  bn.eval()
  y_eval = bn(jnp.asarray(x))
  ref_eval = (x - rrm) / np.sqrt(rrv + 1e-5) * gamma + beta
  np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], rrm, rtol=1e-6)  # eval: no update


def test_batchnorm_matches_torch_batchnorm2d():
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(8, 6, 6, 16)) * 2 - 1).astype(np.float32)
  bn, gamma, beta, rm, rv = _bn_with_stats(16, rng)
  tbn = torch.nn.BatchNorm2d(16)
  with torch.no_grad():
    tbn.weight.copy_(torch.tensor(gamma)); tbn.bias.copy_(torch.tensor(beta))
    tbn.running_mean.copy_(torch.tensor(rm)); tbn.running_var.copy_(torch.tensor(rv))
    ty = tbn.train()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  y = bn(jnp.asarray(x))
  np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spread", [2.0, 3e-3], ids=["spread", "near_constant"])
def test_batchnorm_gradient_matches_torch_batchnorm2d(spread):
  """The closed-form backward (`L.batch_norm_train`) against torch's autograd, train mode;
  near-constant channels (variance ~1e-5, as epsilon) are where epsilon shapes the gradient."""
  rng = np.random.default_rng(3)
  x = ((rng.normal(size=(8, 6, 6, 16)) + 1.5) * spread).astype(np.float32)
  w = rng.normal(size=x.shape).astype(np.float32)
  bn, gamma, beta, _, _ = _bn_with_stats(16, rng)
  graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
  loss = lambda x, params: jnp.sum(nnx.merge(graphdef, params, stats)(x) * w)
  dx, dparams = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), params)
  grads = (dx, dparams["scale"], dparams["bias"])
  tbn = torch.nn.BatchNorm2d(16).double().train()  # float64: a reference without rounding
  with torch.no_grad():
    tbn.weight.copy_(torch.tensor(gamma)); tbn.bias.copy_(torch.tensor(beta))
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_()
  (tbn(tx) * torch.from_numpy(w.transpose(0, 3, 1, 2).astype(np.float64))).sum().backward()
  expected = (tx.grad.numpy().transpose(0, 2, 3, 1), tbn.weight.grad.numpy(),
              tbn.bias.grad.numpy())
  for got, want in zip(grads, expected):  # float32 rounding, relative to the largest entry
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batchnorm_statistics_outputs_have_autodiff_gradients(dtype):
  """Gradients that reach the returned batch mean and variance are those of plain autodiff."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(3, 2, (8, 5, 5, 16)), dtype)
  scale, bias = (jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32),
                 jnp.asarray(rng.normal(size=16), jnp.float32))
  weights = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (16,), (16,))]

  def autodiff_batch_norm(x, scale, bias, epsilon, dtype):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
    inv = jax.lax.rsqrt(var + epsilon) * scale
    return (xf * inv + (bias - mean * inv)).astype(dtype), mean, var

  def loss(batch_norm):
    return lambda *args: sum(jnp.sum(out.astype(jnp.float32) * w) for out, w in
                             zip(batch_norm(*args, 1e-5, dtype), weights))

  got = jax.grad(loss(L.batch_norm_train), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(loss(autodiff_batch_norm), argnums=(0, 1, 2))(x, scale, bias)
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max()


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1e4, 1.0), (1e3, 1e-2)])
def test_batchnorm_one_pass_statistics_hold_for_large_mean_channels(mean, std):
  """The batch variance from one shifted pass is as exact as the two-pass one in float32 (an
  unshifted E[x²] − E[x]² returns rounding noise for these channels)."""
  x = np.random.default_rng(5).normal(mean, std, (64, 8, 8, 16)).astype(np.float32)
  _, batch_mean, var = L.batch_norm_train(jnp.asarray(x), jnp.ones(16), jnp.zeros(16), 1e-5,
                                          jnp.float32)
  x64 = x.astype(np.float64)
  # XLA:CPU's own reductions (jaxlib 0.10 with its YNNPACK fusions off, sortkd_jax/__init__.py)
  # add in order: 2.1e-5 off for (1e3, 1e-2), where a two-pass float32 variance is 6.8e-4 off.
  np.testing.assert_allclose(var, x64.var(axis=(0, 1, 2)), rtol=5e-5)
  np.testing.assert_allclose(batch_mean, x64.mean(axis=(0, 1, 2)), rtol=1e-6, atol=1e-6 * std)


def test_batchnorm_bf16_keeps_float32_statistics():
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(16, 4, 4, 8)) * 4 + 100).astype(np.float32)  # large mean
  bn, gamma, beta, rm, rv = _bn_with_stats(8, rng, dtype=jnp.bfloat16)
  y = bn(jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  ry, rrm, rrv = _np_bn_train(xb, gamma, beta, rm, rv)
  np.testing.assert_allclose(bn.mean[...], rrm, rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], rrv, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(y, np.float32), ry, rtol=1e-2, atol=1e-2)


def test_train_eval_switch_reaches_every_batchnorm():
  m = models.create_model("MobileNetV2", rngs=nnx.Rngs(0))
  bns = [mod for _, mod in nnx.iter_modules(m) if isinstance(mod, L.BatchNorm)]
  assert len(bns) == 53 and not any(b.use_running_average for b in bns)  # fresh = train
  m.eval()
  assert all(b.use_running_average for b in bns)
  m.train()
  assert not any(b.use_running_average for b in bns)
  view = nnx.view(m, use_running_average=True)
  assert all(b.use_running_average for _, b in nnx.iter_modules(view) if isinstance(b, L.BatchNorm))
  assert not any(b.use_running_average for b in bns)


def test_wrn_double_running_stat_update():
  """Spec §2.3 quirk: block2.layer.0.bn1, block3.layer.0.bn1 and the head bn1 update
  twice per training forward (running ← 0.81·running + 0.19·batch); the logits and the
  other BNs are unaffected."""
  m2 = models.create_model("wrn_16_1", rngs=nnx.Rngs(0))
  doubled = {".".join(map(str, p)) for p, mod in nnx.iter_modules(m2)
             if isinstance(mod, L.BatchNorm) and mod.stat_updates == 2}
  assert doubled == {"block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"}
  # Same weights and non-trivial running stats, single update everywhere.
  rng = np.random.default_rng(0)
  for _, mod in nnx.iter_modules(m2):
    if isinstance(mod, L.BatchNorm):
      mod.mean[...] = jnp.asarray(rng.normal(size=mod.num_features), jnp.float32)
      mod.var[...] = jnp.asarray(rng.uniform(0.5, 2, size=mod.num_features), jnp.float32)
  m1 = nnx.clone(m2)
  for _, mod in nnx.iter_modules(m1):
    if isinstance(mod, L.BatchNorm):
      mod.stat_updates = 1
  before = nnx.to_pure_dict(nnx.state(m2, nnx.BatchStat))
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  np.testing.assert_array_equal(m1(x), m2(x))
  s1 = nnx.to_pure_dict(nnx.state(m1, nnx.BatchStat))
  s2 = nnx.to_pure_dict(nnx.state(m2, nnx.BatchStat))

  def get(tree, path):
    for p in path.split("."):
      tree = tree[int(p) if p.isdigit() else p]
    return tree

  for path in ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1", "block1.layer.0.bn1",
               "block2.layer.1.bn2"):
    for stat in ("mean", "var"):
      r0, r1, r2 = (np.asarray(get(t, path)[stat], np.float64) for t in (before, s1, s2))
      batch = (r1 - 0.9 * r0) / 0.1
      expected = 0.81 * r0 + 0.19 * batch if path in doubled else r1
      np.testing.assert_allclose(r2, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Parameter-free ops and initialisation.
# --------------------------------------------------------------------------------------


def test_channel_shuffle_matches_nchw_reference():
  x = np.arange(2 * 12, dtype=np.float32).reshape(1, 1, 2, 12)  # NHWC, C = 12
  for g in (2, 3):
    nchw = x.transpose(0, 3, 1, 2)
    n, c, h, w = nchw.shape
    ref = nchw.reshape(n, g, c // g, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
    np.testing.assert_array_equal(L.channel_shuffle(jnp.asarray(x), g),
                                  ref.transpose(0, 2, 3, 1))


def test_avg_pool_counts_padding_and_max_pool_ignores_it():
  x = jnp.ones((1, 4, 4, 1))
  out = np.asarray(L.avg_pool(x, 3, 2, 1))[0, :, :, 0]
  np.testing.assert_allclose(out, [[4 / 9, 6 / 9], [6 / 9, 1.0]])
  t = torch.nn.functional.avg_pool2d(torch.ones(1, 1, 4, 4), 3, 2, 1)
  np.testing.assert_allclose(out, t[0, 0].numpy())
  np.testing.assert_array_equal(L.max_pool(-jnp.ones((1, 4, 4, 1)), 3, 2, 1), -1.0)


def _std(x):
  return float(np.std(np.asarray(x)))


def test_initialisation_follows_the_reference():
  """Spec §1 init table (statistical checks on large tensors)."""
  r = models.create_model("resnet8x4", rngs=nnx.Rngs(0))
  k = r.layer3[0].conv2.kernel[...]  # [3, 3, 256, 256], kaiming normal fan_out
  assert abs(_std(k) / np.sqrt(2 / (9 * 256)) - 1) < 0.02
  assert abs(float(np.mean(k))) < 1e-3
  bound = 1 / np.sqrt(256)
  assert 0.9 * bound < float(np.abs(r.fc.kernel[...]).max()) <= bound  # torch default Linear
  assert 0.9 * bound < float(np.abs(r.fc.bias[...]).max()) <= bound
  np.testing.assert_array_equal(r.bn1.scale[...], 1.0)
  np.testing.assert_array_equal(r.bn1.bias[...], 0.0)

  s = models.create_model("ShuffleV1", rngs=nnx.Rngs(0))  # kaiming_uniform(a=√5)
  k = s.layer3[1].conv1.kernel[...]  # [1, 1, 320/3 → 320, 240] grouped: fan_in = 320/3·1
  fan_in = k.shape[0] * k.shape[1] * k.shape[2]
  assert 0.95 / np.sqrt(fan_in) < float(np.abs(k).max()) <= 1 / np.sqrt(fan_in)

  v = models.create_model("vgg8", rngs=nnx.Rngs(0))
  assert abs(_std(v.classifier.kernel[...]) / 0.01 - 1) < 0.05
  np.testing.assert_array_equal(v.classifier.bias[...], 0.0)
  np.testing.assert_array_equal(v.block3[0].bias[...], 0.0)
  assert abs(_std(v.block3[0].kernel[...]) / np.sqrt(2 / (9 * 512)) - 1) < 0.02

  w = models.create_model("wrn_16_2", rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(w.fc.bias[...], 0.0)
  assert float(np.abs(w.fc.kernel[...]).max()) <= 1 / np.sqrt(128)


# Spec §1's initialisation table, one model per row: (conv weights, Linear weight, Linear bias).
_INIT_TABLE = {
    "resnet8x4": ("fan_out", "torch", "torch"), "ResNet18": ("fan_out", "torch", "torch"),
    "wrn_16_2": ("fan_out", "torch", "zero"), "vgg8": ("fan_out", "normal_0.01", "zero"),
    "MobileNetV2": ("fan_out", "normal_0.01", "zero"), "ShuffleV1": ("torch", "torch", "torch"),
    "ShuffleV2": ("torch", "torch", "torch"), "imagenet_MobileNetV1": ("torch", "torch", "torch"),
    "imagenet_ResNet18": ("fan_out", "torch", "torch")}


@pytest.mark.parametrize("name", sorted(_INIT_TABLE))
def test_every_family_initialises_as_the_spec_table_says(name):
  """All convolutions and the classifier of one model of each family: normal(0, √(2/(k²·out)))
  has unit normalised std; torch's default U(±1/√fan_in) stays within its bound, with a mean
  |w|/bound of 1/2; conv biases are 0."""
  conv_init, linear_init, bias_init = _INIT_TABLE[name]
  model = models.create_model(name, rngs=nnx.Rngs(0))
  nodes = [node for _, node in nnx.iter_graph(model)]
  convs = [m for m in nodes if isinstance(m, nnx.Conv)]
  (fc,) = [m for m in nodes if isinstance(m, nnx.Linear)]
  for c in convs:  # each one, within 6 standard errors of its own size
    k = np.asarray(c.kernel[...])  # [kh, kw, in / groups, out]
    if conv_init == "fan_out":
      z = k / np.sqrt(2 / (k.shape[0] * k.shape[1] * k.shape[3]))
      assert abs(np.std(z) - 1) < max(0.02, 6 / np.sqrt(2 * k.size)), c.kernel.shape
    else:
      r = np.abs(k) * np.sqrt(np.prod(k.shape[:3]))  # |w| / bound
      assert r.max() <= 1 + 1e-6 and abs(r.mean() - 0.5) < max(0.01, 1.8 / np.sqrt(k.size))
    if c.bias is not None:
      np.testing.assert_array_equal(c.bias[...], 0.0)
  w, b, bound = np.asarray(fc.kernel[...]), np.asarray(fc.bias[...]), 1 / np.sqrt(fc.in_features)
  if linear_init == "torch":
    assert np.abs(w).max() <= bound and abs(np.abs(w).mean() / bound - 0.5) < 0.02
  else:
    assert abs(np.std(w) / 0.01 - 1) < 0.05
  if bias_init == "zero":
    np.testing.assert_array_equal(b, 0.0)
  else:
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.8 * bound


@pytest.mark.parametrize("size,pools", [(32, 3), (64, 4), (128, 3)])
def test_vgg_pools_once_more_at_64_px_only(size, pools, monkeypatch):
  """mdistiller's VGG adds a max-pool after block 3 when the input is 64 px high (`h == 64`,
  TinyImageNet), not at other sizes."""
  model = models.create_model("vgg8", 10, rngs=nnx.Rngs(0))
  calls = []
  max_pool = L.max_pool
  monkeypatch.setattr(L, "max_pool", lambda *args: calls.append(1) or max_pool(*args))
  assert model(jnp.zeros((1, size, size, 3))).shape == (1, 10)
  assert len(calls) == pools


def test_pools_are_differentiable():
  """avg_pool must lower to reduce_window_sum (a generic reduce_window has no VJP)."""
  x = jnp.ones((1, 4, 4, 2))
  g = jax.jit(jax.grad(lambda x: L.avg_pool(x, 3, 2, 1).sum()))(x)
  np.testing.assert_allclose(g[0, :2, :2, 0], [[1 / 9, 2 / 9], [2 / 9, 4 / 9]], rtol=1e-6)
  ramp = jnp.arange(16.0).reshape(1, 4, 4, 1)
  g = jax.jit(jax.grad(lambda x: L.max_pool(x * ramp, 3, 2, 1).sum()))(x)
  # The gradient goes to each window's maximum: positions (1,1)=5, (1,3)=7, (3,1)=13, (3,3)=15.
  expected = np.zeros((4, 4))
  expected[1, 1], expected[1, 3], expected[3, 1], expected[3, 3] = 5, 7, 13, 15
  np.testing.assert_array_equal(g[0, :, :, 0], expected)


def test_train_step_gradient_with_pure_dict_states():
  """The trainer's pattern (pure-dict params/stats, merge inside value_and_grad under jit)
  through ShuffleV1, which has every special op: grouped/depthwise convs, shuffles,
  the count_include_pad avg-pool shortcut and concatenations."""
  m = models.create_model("ShuffleV1", rngs=nnx.Rngs(0))
  graphdef, params, stats = nnx.split(m, nnx.Param, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

  def loss_fn(params, stats):
    model = nnx.merge(graphdef, params, stats)
    logits = model(x)
    loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), jnp.array([3, 7])])
    return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, stats)
  assert np.isfinite(float(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["layer1"][0]["conv1"]["kernel"]).sum()) > 0
  assert not np.allclose(new_stats["layer2"][3]["bn2"]["var"], stats["layer2"][3]["bn2"]["var"])
