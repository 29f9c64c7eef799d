"""Whole training steps against PyTorch: mdistiller's distiller step (frozen eval-mode teacher,
Sort-KD's `sort`, the method's loss dict summed, a train-mode student, torch.optim.SGD with the
per-epoch lr; KD, DKD, LSKD and CTKD's global temperature) re-implemented in torch, from the same
weights and batches, compared with the trainer's jitted step. The reference runs in float64, so
the tolerances bound this project's float32 error against the exact computation, not against
PyTorch's own float32 rounding (which on CPU was 400 times larger here: 6e-5 on the LSKD student's
weights after 3 steps, against 1.4e-7).

The part tests (models against the porting fixtures, BatchNorm against torch, losses against
float64 formulas, the optimizer against torch SGD) each see one piece; this one sees them
composed: gradients through the residual network, weight decay on every parameter, the running
statistics, the epoch count behind the lr schedule and DKD's warm-up, the teacher as the trainer
loads it (a teacher with trained-like BatchNorms, folded), CTKD's gradient reversal and its θ
under the same SGD.
"""

import importlib.metadata
import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from configs import cifar_ctkd, cifar_dkd, cifar_kd, cifar_lskd
from helpers import run_python
from mdistiller_torch import torch_model
from sortkd_jax import checkpoint, evaluation, methods, models, porting, teachers, train

NUM_CLASSES = 100
STEPS_PER_EPOCH = 1  # so that 3 steps cross two lr decays and DKD's warm-up moves each step


def sort_reference(v, y):
  """Sort-KD's `sort`: y first (its logit + 1e9), then the classes by descending logit; the
  class at position j receives the j-th largest logit. (Random logits have no ties.)"""
  order = torch.argsort(v.scatter_add(1, y[:, None], torch.full_like(v[:, :1], 1e9)), 1,
                        descending=True)
  return torch.empty_like(v).scatter_(1, order, torch.sort(v, 1, descending=True).values)


def kd_loss(z, v, temperature):
  """mdistiller kd_loss."""
  log_p = F.log_softmax(z / temperature, dim=1)
  q = F.softmax(v / temperature, dim=1)
  return F.kl_div(log_p, q, reduction="none").sum(1).mean() * temperature**2


def dkd_loss(z, v, y, alpha, beta, temperature):
  """mdistiller dkd_loss, with its masks and its -1000 on the target's logit."""
  gt = torch.zeros_like(z).scatter_(1, y[:, None], 1.0)
  other = 1.0 - gt
  cat = lambda p: torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)
  p_s, p_t = cat(F.softmax(z / temperature, 1)), cat(F.softmax(v / temperature, 1))
  tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * temperature**2 / y.shape[0]
  nckd = F.kl_div(F.log_softmax(z / temperature - 1000.0 * gt, 1),
                  F.softmax(v / temperature - 1000.0 * gt, 1),
                  reduction="sum") * temperature**2 / y.shape[0]
  return alpha * tckd + beta * nckd


def standardize(x):
  """LSKD's `normalize`: z-score per row, unbiased std, 1e-7 added to it."""
  return (x - x.mean(1, keepdim=True)) / (1e-7 + x.std(1, keepdim=True))


class ReverseGradient(torch.autograd.Function):
  """CTKD's gradient reversal: identity forward, gradient × −λ backward."""

  @staticmethod
  def forward(ctx, x, lambda_):
    ctx.lambda_ = lambda_
    return x.view_as(x)

  @staticmethod
  def backward(ctx, grad):
    return -ctx.lambda_ * grad, None


def torch_losses(config, z, v, y, epoch, theta):
  """The distiller's loss dict for `config.method`, as mdistiller and the LSKD and CTKD forks
  define it (CTKD: global temperature over KD)."""
  ce = F.cross_entropy(z, y)
  if config.method == "ctkd":
    c = config.ctkd
    lambda_ = 0.5 * (1 - math.cos(math.pi * min(epoch, c.ramp_epochs) / c.ramp_epochs))
    temperature = c.t_start + c.t_end * torch.sigmoid(ReverseGradient.apply(theta, lambda_))
    return [config.kd.ce_weight * ce, config.kd.kd_weight * kd_loss(z, v, temperature)]
  if config.method == "kd":
    c = config.kd
    return [c.ce_weight * ce, c.kd_weight * kd_loss(z, v, c.temperature)]
  if config.method == "dkd":
    c = config.dkd
    return [c.ce_weight * ce, min(epoch / c.warmup_epochs, 1.0) * dkd_loss(
        z, v, y, c.alpha, c.beta, c.temperature)]
  c = config.lskd  # over KD
  return [c.ce_weight * ce,
          c.kd_weight * kd_loss(standardize(z), standardize(v), c.temperature)]


def torch_train(config, student, teacher, batches):
  """mdistiller's loop: lr set per epoch, teacher under no_grad, zero_grad/backward/step.
  Returns the losses and CTKD's θ (None for the other methods)."""
  theta = (torch.nn.Parameter(torch.tensor(config.ctkd.init, dtype=torch.float64))
           if config.method == "ctkd" else None)
  optimizer = torch.optim.SGD([*student.parameters(), *([theta] if theta is not None else [])],
                              lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
  student.train()
  teacher.eval()
  step_losses = []
  for step, (images, labels) in enumerate(batches):
    epoch = step // STEPS_PER_EPOCH + 1
    for group in optimizer.param_groups:
      group["lr"] = config.lr * config.lr_decay_rate ** sum(epoch > s
                                                            for s in config.lr_decay_epochs)
    x = torch.tensor(images, dtype=torch.float64).permute(0, 3, 1, 2)
    y = torch.tensor(labels).long()
    with torch.no_grad():
      v = teacher(x)
    if config.sort:
      v = sort_reference(v, y)
    loss = sum(torch_losses(config, student(x), v, y, epoch, theta))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    step_losses.append(loss.item())
  return step_losses, theta


@pytest.mark.parametrize("module", [cifar_kd, cifar_dkd, cifar_lskd, cifar_ctkd],
                         ids=["kd", "dkd", "lskd", "ctkd"])
def test_training_steps_match_an_mdistiller_step_in_torch(module, tmp_path):
  config = module.get_config("res56_res20")
  config.student.name, config.teacher.name = "resnet8", "resnet14"
  config.teacher.checkpoint = str(tmp_path / "teacher")
  config.lr_decay_epochs = [1, 2]  # lr, lr/10, lr/100 in steps 1, 2, 3
  assert config.sort and config.teacher.fold_batchnorm
  flax_teacher = models.create_model("resnet14", NUM_CLASSES, rngs=nnx.Rngs(7))
  rng = np.random.default_rng(1)
  for _, layer in nnx.iter_graph(flax_teacher):  # a trained teacher's BatchNorms, for folding
    if isinstance(layer, models.BatchNorm):
      c = layer.num_features
      for variable, values in ((layer.mean, rng.normal(0, 0.2, c)),
                               (layer.var, rng.uniform(0.5, 2, c)),
                               (layer.scale, rng.uniform(0.5, 1.5, c)),
                               (layer.bias, rng.normal(0, 0.2, c))):
        variable[...] = values.astype(np.float32)
  checkpoint.save_model(config.teacher.checkpoint, flax_teacher, arch="resnet14",
                        num_classes=NUM_CLASSES)

  optimizer = train.make_optimizer(config, STEPS_PER_EPOCH)
  state, train_graphdef, eval_graphdef = train.create_train_state(config, NUM_CLASSES, optimizer)
  initial_student = nnx.merge(train_graphdef, state.params["student"], state.batch_stats)
  student = torch_model(8, initial_student).double()
  teacher = torch_model(14, flax_teacher).double()

  batches = [(rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
              rng.integers(0, NUM_CLASSES, 16).astype(np.int32)) for _ in range(3)]
  expected_losses, theta = torch_train(config, student, teacher, batches)

  network, teacher_vars = evaluation.freeze(
      teachers.load_teacher(config.teacher, NUM_CLASSES, image_size=32)[0])
  step = jax.jit(train.make_train_step(config, student_graphdef=train_graphdef,
                                       optimizer=optimizer, steps_per_epoch=STEPS_PER_EPOCH))
  losses = []
  for images, labels in batches:
    targets = methods.teacher_targets(config, network(teacher_vars, images), labels)
    state, metrics = step(state, images, labels, targets)
    losses.append(float(metrics["loss"] / metrics["count"]))

  # Measured: 4e-7 (KD, DKD, LSKD); 6.5e-6 with CTKD's τ ≈ 15.6, whose τ² ≈ 243 multiplies
  # the float32 rounding of near-uniform softmaxes' KL.
  np.testing.assert_allclose(losses, expected_losses, rtol=5e-5)
  trained = porting.export_state_dict(
      nnx.merge(train_graphdef, state.params["student"], state.batch_stats))
  reference = {k: v.numpy() for k, v in student.state_dict().items()
               if not k.endswith("num_batches_tracked")}
  assert trained.keys() == reference.keys()
  if theta is not None:
    # θ moves by 3.5e-5 in 3 steps (λ ≤ 0.21, the lr falls tenfold each step); float32 holds
    # θ ≈ 1 to 6e-8.
    np.testing.assert_allclose(state.params["ctkd_theta"], theta.item(), rtol=0, atol=2e-7)
  # Weights, biases, BatchNorm γ/β (max |Δ| 1.4e-7 to 8e-7, DKD's the largest, on this project's
  # CPU machines) and running statistics. With XLA:CPU's YNNPACK fusions, which the package turns
  # off, DKD's and LSKD's were 6e-6 off on a 2-core AVX-512 Xeon (see the test below).
  for key in reference:
    np.testing.assert_allclose(trained[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # The trained student in eval mode: its running statistics at work.
  images = batches[0][0]
  with torch.no_grad():
    expected_logits = student.eval()(torch.tensor(images, dtype=torch.float64).permute(
        0, 3, 1, 2)).numpy()
  logits = evaluation.Network(eval_graphdef)((state.params["student"], state.batch_stats), images)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=5e-6)  # max |Δ| 4e-7


_FLAGS_AND_FUSIONS = """
import os
import jax
import jax.numpy as jnp
import sortkd_jax
print(os.environ.get("XLA_FLAGS"))
program = jax.jit(lambda x: jnp.sum(jax.nn.relu(x), axis=0)).lower(jnp.ones((64, 64))).compile()
print("ynn" in program.as_text())
"""


def test_importing_the_package_turns_off_the_ynn_fusions_of_jaxlib_0_10():
  """With XLA:CPU's YNNPACK fusions, jaxlib 0.10.2 computed the steps above wrongly on two CPU
  threads (right on one; sortkd_jax/__init__.py): imported before JAX's first computation, the
  package turns them off, keeping the XLA flags given, and leaves a value given for that flag."""
  given = "--xla_force_host_platform_device_count=2"
  result = run_python("-c", _FLAGS_AND_FUSIONS, env={"XLA_FLAGS": given})
  assert result.returncode == 0, result.stderr
  if importlib.metadata.version("jaxlib").split(".")[:2] != ["0", "10"]:
    assert result.stdout.splitlines()[0] == given
    return  # other versions may not know the flag, and XLA aborts on an unknown one
  assert result.stdout.splitlines() == [f"{given} --xla_cpu_experimental_ynn_fusion_type=",
                                        "False"]
  chosen = f"{given} --xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"
  result = run_python("-c", _FLAGS_AND_FUSIONS, env={"XLA_FLAGS": chosen})
  assert result.stdout.splitlines() == [chosen, "True"], result.stderr


_COMPUTE_THEN_IMPORT = """
import warnings
import jax.numpy as jnp
jnp.ones(3).block_until_ready()
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  import sortkd_jax
print([str(warning.message) for warning in caught if warning.category is RuntimeWarning])
"""


def test_importing_the_package_after_jax_ran_on_the_cpu_warns_that_ynn_fusions_stay_on():
  """JAX code run before the import has started XLA:CPU with its fusions: the flag comes too
  late, and the user learns how to have it, unless the flag was given already."""
  result = run_python("-c", _COMPUTE_THEN_IMPORT, env={"XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr
  if importlib.metadata.version("jaxlib").split(".")[:2] != ["0", "10"]:
    assert result.stdout.strip() == "[]"
    return
  assert "JAX ran on the CPU before sortkd_jax was imported" in result.stdout
  assert "XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type='" in result.stdout
  given = "--xla_cpu_experimental_ynn_fusion_type="
  result = run_python("-c", _COMPUTE_THEN_IMPORT, env={"XLA_FLAGS": given})
  assert result.stdout.strip() == "[]", result.stderr
