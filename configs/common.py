"""Shared pieces of the experiment recipes: the mdistiller training recipe and the per-pair table.

Each `configs/<dataset>_<method>.py` file builds on these; every loss group (kd, dkd, lskd, ctkd)
is always present, filled with the pair's published settings, so `--config.method=dkd` on
configs/cifar_kd.py gives the reference DKD recipe for that pair. Two files set more than their
method, which a switch keeps: cifar_vanilla.py turns Sort off, and cifar_lskd.py takes KD+LS's
per-pair τ and λ_KD (below); to switch method, start from the method's own file or a KD one.
Sources: docs/methods.md and §7 of docs/mdistiller_spec.md.
"""

from __future__ import annotations

import difflib

import ml_collections

# teacher -> student pairs of the Sort-KD / DKD CIFAR-100 tables.
# lr 0.01 for MobileNet/ShuffleNet students; DKD's beta per pair (methods.md, DKD table).
CIFAR_PAIRS = {
    "res56_res20": dict(teacher="resnet56", student="resnet20", dkd_beta=2.0, lr=0.05),
    "res110_res32": dict(teacher="resnet110", student="resnet32", dkd_beta=2.0, lr=0.05),
    "res32x4_res8x4": dict(teacher="resnet32x4", student="resnet8x4", dkd_beta=8.0, lr=0.05),
    "wrn40_2_wrn16_2": dict(teacher="wrn_40_2", student="wrn_16_2", dkd_beta=6.0, lr=0.05),
    "wrn40_2_wrn40_1": dict(teacher="wrn_40_2", student="wrn_40_1", dkd_beta=6.0, lr=0.05),
    "vgg13_vgg8": dict(teacher="vgg13", student="vgg8", dkd_beta=6.0, lr=0.05),
    "res32x4_shuv1": dict(teacher="resnet32x4", student="ShuffleV1", dkd_beta=8.0, lr=0.01),
    "res32x4_shuv2": dict(teacher="resnet32x4", student="ShuffleV2", dkd_beta=8.0, lr=0.01),
    "wrn40_2_shuv1": dict(teacher="wrn_40_2", student="ShuffleV1", dkd_beta=8.0, lr=0.01),
    "vgg13_mv2": dict(teacher="vgg13", student="MobileNetV2", dkd_beta=6.0, lr=0.01),
    "res50_mv2": dict(teacher="ResNet50", student="MobileNetV2", dkd_beta=8.0, lr=0.01),
}

# KD+LS (the lskd recipe): the LSKD repo's README links each published CIFAR figure to a log
# named kd,TEACHER,STUDENT,τ,λ_KD. Those are methods.md's τ=2, λ_KD=9 except on these pairs
# (res50_mv2's λ_KD=1 shows in its logged epoch-1 loss too: 1.51, against 9.80 for vgg13_vgg8).
# CTKD+LS's logs use 2, 9 on every pair, so only the lskd recipe takes these.
KD_LS_PUBLISHED = {
    "vgg13_vgg8": dict(temperature=3.0),
    "vgg13_mv2": dict(temperature=3.0),
    "res50_mv2": dict(temperature=3.0, kd_weight=1.0),
}

IMAGENET_PAIRS = {
    "r34_r18": dict(teacher="imagenet_ResNet34", student="imagenet_ResNet18", dkd_beta=0.5,
                    lskd_ce_weight=1.0),
    "r50_mv1": dict(teacher="imagenet_ResNet50", student="imagenet_MobileNetV1", dkd_beta=2.0,
                    lskd_ce_weight=0.1),  # not published for this pair: CIFAR's value
}


def parse_arg(arg: str | None, pairs: dict, default: str,
              models: tuple[str, ...] = ()) -> tuple[str, bool]:
  """Splits `PAIR[,runlocal]` (or `MODEL[,runlocal]`, MODEL one of `models`) and checks the
  name."""
  parts = [p for p in (arg or default).split(",") if p]
  name = parts[0] if parts and parts[0] != "runlocal" else default
  unknown = [p for p in parts if p not in (name, "runlocal")]
  if (name not in pairs and name not in models) or unknown:
    close = (difflib.get_close_matches(unknown[0], ["runlocal"]) if unknown else
             difflib.get_close_matches(name, [*pairs, *models], n=3))
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    usage = "PAIR or PAIR,runlocal with PAIR"
    if models:
      usage = f"MODEL or MODEL,runlocal with MODEL one of: {', '.join(models)}; or {usage}"
    raise ValueError(f"Unknown config argument {arg!r}{hint}. Use {usage} one of: "
                     f"{', '.join(sorted(pairs))}.")
  return name, "runlocal" in parts


def _cifar_student_lr(student: str) -> float:
  """The pairs' lr for a CIFAR student: 0.01 for MobileNetV2 and the ShuffleNets, else 0.05."""
  return next((p["lr"] for p in CIFAR_PAIRS.values() if p["student"] == student), 0.05)


def _optional(field_type: type) -> ml_collections.FieldReference:
  """A field that defaults to None but can be set from the command line."""
  return ml_collections.FieldReference(None, field_type=field_type)


def _base_config(method: str, pair: str | None, teacher: str, student: str
                 ) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.pair = pair  # None: a recipe argument naming a model, not a pair
  c.method = method
  c.sort = True
  c.teacher = ml_collections.ConfigDict(dict(name=teacher))
  # Where the README's port_weights.py command puts it; follows --config.teacher.name.
  c.teacher.checkpoint = "teachers/" + c.teacher.get_ref("name")
  # Fold the frozen teacher's BatchNorms into its convolutions: 6% (batch 64 fp32) to 14%
  # (batch 2048 bf16) faster steps on an H200; logits equal up to float rounding (folding.py).
  c.teacher.fold_batchnorm = True
  c.student = ml_collections.ConfigDict(dict(name=student))
  # name: a tfds dataset; folder: torchvision's cifar-100-python/ (mdistiller's data) or an
  # image folder with train/<class>/ and test/<class>/.
  # max_*_examples (smoke tests): on_device keeps the split's first N; tf_data shortens each
  # epoch to ceil(N / batch_size) batches of the whole, shuffled train split (and evaluates the
  # first N).
  c.data = ml_collections.ConfigDict(dict(
      name="cifar100", data_dir=_optional(str), folder=_optional(str), cache_dir=_optional(str),
      image_size=32, train_split="train", test_split="test", download=True,
      max_train_examples=_optional(int), max_test_examples=_optional(int)))
  # on_device: the split lives on the accelerator, augmented per dispatch; tf_data: streamed.
  c.data.pipeline = "on_device"
  # Run settings. seed and dtype ('bfloat16': mixed precision) change the numbers; the rest
  # only speed and output.
  c.seed = 0
  c.dtype = "float32"
  c.steps_per_dispatch = _optional(int)  # None: 32 on GPU/TPU, 1 on CPU (train.py says why)
  # A GPU experiment (README, Speed): >1 runs the teacher in this many groups of a dispatch's
  # steps, each on a second stream beside the student's steps on the group before.
  c.teacher_stream_groups = 1
  c.log_every_steps = 200
  c.checkpoints_to_keep = 2
  return c


def cifar_config(arg: str | None, method: str,
                 models: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """The CIFAR-100 recipe of mdistiller (spec §7.1–7.5) for one pair and method. An argument
  naming one of `models` instead (cifar_vanilla.py) makes that model the student, at its lr,
  and names no pair; the teacher fields are then the default pair's."""
  default = "res32x4_res8x4"
  name, runlocal = parse_arg(arg, CIFAR_PAIRS, default, models)
  pair = name if name in CIFAR_PAIRS else None
  p = CIFAR_PAIRS[pair] if pair else dict(CIFAR_PAIRS[default], student=name,
                                            lr=_cifar_student_lr(name))
  c = _base_config(method, pair, p["teacher"], p["student"])

  # Optimiser and schedule: SGD(0.9), coupled wd on every student parameter, per-epoch steps.
  c.batch_size = 64
  c.eval_batch_size = 1000
  c.num_epochs = 240
  c.lr = p["lr"]
  c.lr_decay_epochs = (150, 180, 210)
  c.lr_decay_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 5e-4

  # Loss hyper-parameters (methods.md). `method` picks the group that is used.
  c.kd = ml_collections.ConfigDict(dict(temperature=4.0, ce_weight=0.1, kd_weight=0.9))
  c.dkd = ml_collections.ConfigDict(dict(
      ce_weight=1.0, alpha=1.0, beta=p["dkd_beta"], temperature=4.0, warmup_epochs=20))
  c.lskd = ml_collections.ConfigDict(dict(
      base="kd", temperature=2.0, ce_weight=0.1, kd_weight=9.0, dkd_weight_scale=9.0))
  if method == "lskd":
    c.lskd.update(KD_LS_PUBLISHED.get(pair, {}))
  c.ctkd = ml_collections.ConfigDict(dict(
      base="kd", standardize=False, t_start=1.0, t_end=20.0, init=1.0, ramp_epochs=10))
  # lskd.ce_weight and kd_weight weigh base kd; base dkd takes dkd's weights and warm-up, its α
  # and β times lskd.dkd_weight_scale. CTKD takes its base's group (lskd's as above when it
  # standardizes), with τ learned.

  if runlocal:  # a CPU smoke test: tiny batches, two short epochs.
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 2
    c.lr_decay_epochs = (1,)
    c.dkd.warmup_epochs = 2
    c.ctkd.ramp_epochs = 2
    c.log_every_steps = 4
    c.data.max_train_examples = 72
    c.data.max_test_examples = 100
  return c


def imagenet_config(arg: str | None, method: str) -> ml_collections.ConfigDict:
  """The ImageNet recipe of mdistiller (spec §7.5): batch 512, 100 epochs, lr 0.2, wd 1e-4."""
  pair, runlocal = parse_arg(arg, IMAGENET_PAIRS, "r34_r18")
  p = IMAGENET_PAIRS[pair]
  c = _base_config(method, pair, p["teacher"], p["student"])
  c.data.update(name="imagenet2012", image_size=224, test_split="validation", download=False,
                pipeline="tf_data")
  c.data.shuffle_buffer = 16 * 1024  # examples, after a tfds file shuffle; folders: unused
  c.data.manual_dir = _optional(str)  # the ILSVRC2012 tars, to prepare the tfds dataset once

  c.batch_size = 512
  c.eval_batch_size = 500
  c.num_epochs = 100
  c.lr = 0.2
  c.lr_decay_epochs = (30, 60, 90)
  c.lr_decay_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4

  c.kd = ml_collections.ConfigDict(dict(temperature=1.0, ce_weight=0.5, kd_weight=0.5))
  c.dkd = ml_collections.ConfigDict(dict(
      ce_weight=1.0, alpha=1.0, beta=p["dkd_beta"], temperature=1.0, warmup_epochs=1))
  c.lskd = ml_collections.ConfigDict(dict(
      base="kd", temperature=2.0, ce_weight=p["lskd_ce_weight"], kd_weight=9.0,
      dkd_weight_scale=9.0))
  c.ctkd = ml_collections.ConfigDict(dict(
      base="kd", standardize=False, t_start=1.0, t_end=20.0, init=1.0, ramp_epochs=5))
  c.log_every_steps = 100

  if runlocal:  # a CPU smoke test: small crops, a few images, one epoch at a constant lr.
    c.data.update(image_size=64, shuffle_buffer=64, max_train_examples=16, max_test_examples=10)
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_epochs = 1
    c.lr_decay_epochs = ()
    c.ctkd.ramp_epochs = 1
    c.log_every_steps = 1
  return c
