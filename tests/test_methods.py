"""Every method and base-loss combination of `methods.loss_terms` against float64 references
written from methods.md: KD, DKD, LSKD over KD or DKD, CTKD over KD or DKD, with or without
standardisation. (The losses themselves: test_losses.py; Sort: test_sort.py.)"""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cifar_ctkd, cifar_dkd, cifar_kd, cifar_lskd
from sortkd_jax import losses, methods
from test_losses import np_dkd, np_kd, np_log_softmax, np_standardize

EPOCH = 5  # inside DKD's 20-epoch warm-up (factor 1/4) and CTKD's 10-epoch λ ramp
THETA = 0.3


def np_ce(z, y):
  return -np.mean(np_log_softmax(np.float64(z))[np.arange(len(y)), y])


def expected_terms(config, z, v, y):
  """(CE term, distillation term) from methods.md, in float64; v: the Sort-corrected teacher."""
  kd, dkd, ls, ct = config.kd, config.dkd, config.lskd, config.ctkd
  warmup = min(EPOCH / dkd.warmup_epochs, 1.0)
  if config.method == "ctkd":  # the learned τ = t_start + t_end·sigmoid(θ) replaces T
    temperature = ct.t_start + ct.t_end / (1 + np.exp(-THETA))
    base, standardize = ct.base, ct.standardize
  elif config.method == "lskd":
    temperature, base, standardize = ls.temperature, ls.base, True
  else:
    temperature, base, standardize = config[config.method].temperature, config.method, False
  if standardize:  # LSKD: z-scored logits for the distillation term, raw logits for CE
    zd, vd = np_standardize(z), np_standardize(v)
    if base == "kd":
      return ls.ce_weight * np_ce(z, y), ls.kd_weight * np_kd(zd, vd, temperature)
    return dkd.ce_weight * np_ce(z, y), warmup * np_dkd(
        zd, vd, y, dkd.alpha * ls.dkd_weight_scale, dkd.beta * ls.dkd_weight_scale, temperature)
  if base == "kd":
    return kd.ce_weight * np_ce(z, y), kd.kd_weight * np_kd(z, v, temperature)
  return dkd.ce_weight * np_ce(z, y), warmup * np_dkd(z, v, y, dkd.alpha, dkd.beta, temperature)


COMBINATIONS = {
    "kd": (cifar_kd, {}),
    "dkd": (cifar_dkd, {}),
    "lskd_over_kd": (cifar_lskd, {}),
    "lskd_over_dkd": (cifar_lskd, {"lskd.base": "dkd"}),
    "ctkd_over_kd": (cifar_ctkd, {}),
    "ctkd_over_dkd": (cifar_ctkd, {"ctkd.base": "dkd"}),
    "ctkd_over_lskd": (cifar_ctkd, {"ctkd.standardize": True}),
    "ctkd_over_lskd_dkd": (cifar_ctkd, {"ctkd.standardize": True, "ctkd.base": "dkd"}),
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_loss_terms_match_the_formulas(name):
  module, overrides = COMBINATIONS[name]
  config = module.get_config("res32x4_res8x4")
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  methods.validate(config)
  rng = np.random.default_rng(len(name))
  z = (3 * rng.standard_normal((8, 100))).astype(np.float32)
  v = (3 * rng.standard_normal((8, 100))).astype(np.float32)
  y = rng.integers(0, 100, 8)
  targets = methods.teacher_targets(config, jnp.asarray(v), jnp.asarray(y))
  terms = methods.loss_terms(config, jnp.asarray(z), targets, jnp.asarray(y),
                             jnp.float32(EPOCH), {"ctkd_theta": jnp.float32(THETA)})
  assert sorted(terms) == ["ce", "kd"]
  ce, distill = expected_terms(config, z, np.asarray(targets), y)
  np.testing.assert_allclose(float(terms["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(terms["kd"]), distill, rtol=2e-5)


@pytest.mark.parametrize("module, change, message", [
    (cifar_kd, {"method": "kdd"}, "Unknown config.method 'kdd'"),
    (cifar_kd, {"teacher_logits": None}, "needs the teacher's logits"),
    (cifar_ctkd, {"params": None}, r"'ctkd' needs its trainable parameters \['ctkd_theta'\]"),
])
def test_loss_terms_names_what_is_missing(module, change, message):
  """A library user calling `loss_terms` directly gets the problem named, not a KeyError or
  jnp.array's complaint about None."""
  config = module.get_config("res32x4_res8x4")
  if "method" in change:
    config.method = change["method"]
  logits, labels = jnp.zeros((2, 100)), jnp.array([0, 1])
  arguments = {"teacher_logits": logits, "params": {"ctkd_theta": jnp.float32(0.0)}, **change}
  arguments.pop("method", None)
  with pytest.raises(ValueError, match=message):
    methods.loss_terms(config, logits, labels=labels, epoch=jnp.float32(1.0), **arguments)
  if config.method == "ctkd":  # θ alone, as loss_terms took it before its params dict
    with pytest.raises(TypeError, match=r"params is a dict, as methods.init_params\(config\) "
                       r"makes, e.g. \{'ctkd_theta': θ\}; got ArrayImpl"):
      methods.loss_terms(config, logits, logits, labels, jnp.float32(1.0), jnp.float32(0.0))


def test_a_new_method_is_checked_for_its_group_and_scalar_terms(monkeypatch):
  """What a user adding a method gets wrong first: its hyperparameter group (an AttributeError
  deep in tracing before), or a per-example term (summed into a [B] "loss")."""
  monkeypatch.setitem(methods._REGISTRY, "nkd", lambda config, z, v, y, epoch, params: {
      "ce": losses.cross_entropy(z, y), "nkd": config.nkd.gamma * jnp.sum(v * z, axis=-1)})
  config = cifar_kd.get_config("res32x4_res8x4")
  config.method = "nkd"
  logits, labels = jnp.zeros((2, 100)), jnp.array([0, 1])
  with pytest.raises(ValueError, match="The config has no 'nkd' group for the hyperparameters"):
    methods.loss_terms(config, logits, logits, labels, jnp.float32(1.0))
  config.nkd = ml_collections.ConfigDict({"gamma": 1.5})
  with pytest.raises(ValueError, match=r"'nkd' must give scalar loss terms, got shapes "
                     r"\{'ce': \(\), 'nkd': \(2,\)\}"):
    methods.loss_terms(config, logits, logits, labels, jnp.float32(1.0))


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_unread_fields_are_the_groups_that_do_not_change_the_loss(name):
  """A resume may change the groups `unread_fields` names: none of their fields may change the
  loss, and each group it leaves out must have one that does (else a resume refused a change
  that would not matter: a CTKD run over LSKD's KD was refused a change of `kd.*`)."""
  module, overrides = COMBINATIONS[name]
  config = module.get_config("res32x4_res8x4")
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  rng = np.random.default_rng(0)
  z, v = (jnp.asarray(3 * rng.standard_normal((8, 100)), jnp.float32) for _ in range(2))
  y = jnp.asarray(rng.integers(0, 100, 8))

  def loss(config):
    terms = methods.loss_terms(config, z, v, y, jnp.float32(EPOCH),
                               {"ctkd_theta": jnp.float32(THETA)})
    return float(sum(terms.values()))

  unchanged = loss(config)
  unread = methods.unread_fields(config)
  for group in ("kd", "dkd", "lskd", "ctkd"):
    changes_loss = []
    for field, value in config[group].items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        changed = ml_collections.ConfigDict(config.to_dict())
        changed[group][field] = type(value)(value * 2 + 1)
        changes_loss.append(loss(changed) != unchanged)
    assert any(changes_loss) == (group not in unread), (group, unread)
