"""Training and evaluation of a student by (Sort-)distillation: one `train_and_evaluate` entry.

The core is pure functions of pytrees, jitted once: `(state, batch) -> (state, metrics)`. The
student is an NNX module split into a graphdef and pure-dict states; `nnx.merge` happens only
inside the jitted functions. Data parallelism: `jax.jit` over a 1-D device mesh with the batch
sharded on 'data' and everything else replicated, so BatchNorm statistics are over the global
batch and results do not depend on the device count.

CIFAR-sized splits live on the device: each epoch draws a permutation. A dispatch of
`steps_per_dispatch` steps gathers, augments (crop + flip) and normalises all its batches and runs
the frozen teacher and Sort on them at once, then the student's steps in one `lax.scan`; metrics
stay on the device until the log period. ImageNet streams tf.data batches prefetched to the
device, one step per dispatch. Recipe and reference behaviour: docs/mdistiller_spec.md §7.

Several processes (hosts): `distributed.maybe_initialize` joins them and the mesh spans every
device of every process. A CIFAR-sized split is small, so every process loads all of it and
`distributed.replicate` puts it on every device; the permutation is drawn on the device from
the seed, so all processes gather the same global batch (deliberately: no per-process input).
ImageNet is where each process reads its own shard with tf.data and
`distributed.prefetch_to_device` assembles the global batch with
`jax.make_array_from_process_local_data`. Process 0 writes config.json, metrics and TensorBoard
events; every process takes part in orbax checkpoints, whose directory must be the same shared
path for all. The workdir's lock and resume rules: `workdirs`; the test evaluation after each
epoch: `evaluation`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import itertools
import math
import os
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sortkd_jax import augment
from sortkd_jax import checkpoint
from sortkd_jax import distributed
from sortkd_jax import data_sources  # imports TensorFlow only when data is first read
from sortkd_jax import evaluation
from sortkd_jax import imagenet_input
from sortkd_jax import input_pipeline
from sortkd_jax import losses
from sortkd_jax import methods
from sortkd_jax import models
from sortkd_jax import reporting
from sortkd_jax import teachers
from sortkd_jax import workdirs

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; checkpointed every epoch."""
  step: jax.Array            # optimizer steps taken (int32 scalar)
  params: PyTree             # {'student': ..., **methods.init_params(config)}
  batch_stats: PyTree        # student BatchNorm running statistics
  opt_state: optax.OptState


# ----------------------------------------------------------------------------- optimisation


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """mdistiller's per-epoch step schedule: lr·rate^k, k = #{s : epoch > s}, epochs from 1.

  Each rate is computed in Python floats, as mdistiller does, and rounded to float32 once, as
  torch applies it: optax's piecewise_constant_schedule multiplies in float32, so 0.05·0.1 was
  0.0050000004, not float32(0.005).
  """
  decays_at = jnp.array([int(s) * steps_per_epoch for s in config.lr_decay_epochs], jnp.int32)
  rates = jnp.array([config.lr * config.lr_decay_rate**k
                     for k in range(len(config.lr_decay_epochs) + 1)], jnp.float32)
  return lambda step: rates[jnp.sum(step >= decays_at)]


def make_optimizer(config: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """torch.optim.SGD as mdistiller uses it: coupled L2 decay on every parameter, then momentum.

  Update: g ← ∇L + wd·θ; buf ← m·buf + g; θ ← θ − lr·buf (spec §7.2); no Nesterov.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum))


def epoch_of_step(step: jax.Array, steps_per_epoch: int) -> jax.Array:
  """The 1-based epoch that optimizer step `step` (0-based) belongs to, as float32."""
  return (step // steps_per_epoch + 1).astype(jnp.float32)


# ----------------------------------------------------------------------------- the step


def _train_step(state: TrainState, images, labels, teacher_logits, *, config, student_graphdef,
                optimizer, steps_per_epoch):
  """See `make_train_step`."""
  epoch = epoch_of_step(state.step, steps_per_epoch)

  def loss_fn(params):
    student = nnx.merge(student_graphdef, params["student"], state.batch_stats)
    logits = student(images)
    terms = methods.loss_terms(config, logits, teacher_logits, labels, epoch,
                               _method_params(params))
    new_stats = nnx.to_pure_dict(nnx.state(student, nnx.BatchStat))
    return sum(terms.values()), (terms, logits, new_stats)

  params = state.params
  (loss, (terms, logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = optimizer.update(grads, state.opt_state, params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(params, updates),
                        batch_stats=new_stats, opt_state=opt_state)
  n = jnp.float32(labels.shape[0])
  metrics = {"loss": loss * n, "top1": losses.topk_correct(logits, labels, 1).sum(),
             "count": n, **{f"loss_{k}": v * n for k, v in terms.items()},
             **{k: v * n for k, v in methods.logged_values(config, _method_params(params)).items()}}
  return state, metrics


def _method_params(params: PyTree) -> PyTree:
  """The trainable parameters of the method (`methods.init_params`), beside the student's."""
  return {k: v for k, v in params.items() if k != "student"}


def make_train_step(config: ml_collections.ConfigDict, *, student_graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation, steps_per_epoch: int) -> Callable:
  """`(state, images, labels, teacher_targets) -> (state, metric sums)`: one SGD step on a
  (sharded) batch of normalised images, the teacher's `methods.teacher_targets` being None
  without a teacher. Not jitted: the dispatch functions below call it."""
  return functools.partial(_train_step, config=config, student_graphdef=student_graphdef,
                           optimizer=optimizer, steps_per_epoch=steps_per_epoch)


def _targets_and_teacher_hits(config, teacher_logits: jax.Array, labels: jax.Array
                              ) -> tuple[jax.Array, jax.Array]:
  """`methods.teacher_targets` (Sort applied), and how many of the examples the teacher ranks
  right: its top-1 on the training batches, reported as `teacher_top1`, is the share of rows
  that Sort leaves as they are."""
  return (methods.teacher_targets(config, teacher_logits, labels),
          losses.topk_correct(teacher_logits, labels, 1).sum())


def _one_step(state: TrainState, x: jax.Array, y: jax.Array, *, teacher: evaluation.Network | None,
              teacher_vars, config, train_step) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` on one batch, with its teacher's targets and `teacher_top1` (if any)."""
  if teacher is None:
    return train_step(state, x, y, None)
  targets, hits = _targets_and_teacher_hits(config, teacher(teacher_vars, x), y)
  state, metrics = train_step(state, x, y, targets)
  return state, {**metrics, "teacher_top1": hits}


def _dispatch_teacher_targets(teacher: evaluation.Network, teacher_vars, xs: jax.Array,
                              ys: jax.Array, *, batch_sharding: NamedSharding,
                              config) -> tuple[jax.Array, jax.Array]:
  """`_targets_and_teacher_hits` of a whole dispatch's [steps, batch, ...] inputs, with the
  teacher run on them as one batch.

  Small-batch convolutions use a GPU poorly, and the teacher (eval-mode BatchNorm) and Sort
  treat each example alone, so neither need run step by step. The big batch is put in
  device-major order, so that each device holds its own slices of every step's batch.
  """
  k, b = xs.shape[:2]
  d = batch_sharding.mesh.size
  flat = xs.reshape(k, d, b // d, *xs.shape[2:]).swapaxes(0, 1).reshape(k * b, *xs.shape[2:])
  logits = teacher(teacher_vars, jax.lax.with_sharding_constraint(flat, batch_sharding))
  logits = logits.reshape(d, k, b // d, -1).swapaxes(0, 1).reshape(k, b, -1)
  logits = jax.lax.with_sharding_constraint(
      logits, NamedSharding(batch_sharding.mesh, P(None, "data")))
  return _targets_and_teacher_hits(config, logits, ys)


def _train_chunk(state: TrainState, teacher_vars, images, labels, perm, start, *, num_steps,
                 batch_size, batch_sharding, augment_key, compute_dtype, teacher, config,
                 train_step):
  """`num_steps` steps over perm[start:start+num_steps·batch_size], in one dispatch: the batches
  are gathered and augmented and the teacher's targets computed for all steps first, then the
  student's steps run in a scan (with `config.teacher_stream_groups`, `_steps_beside_teacher`)."""

  def batch(i):
    idx = jax.lax.dynamic_slice_in_dim(perm, start + i * batch_size, batch_size)
    idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
    key = jax.random.fold_in(augment_key, state.step + i)
    x = augment.cifar_train_augment(key, images[idx], dtype=compute_dtype)
    return jax.lax.with_sharding_constraint(x, batch_sharding), labels[idx]

  if num_steps == 1:  # no loop: XLA:CPU runs convolutions inside loops far slower
    return _one_step(state, *batch(0), teacher=teacher, teacher_vars=teacher_vars, config=config,
                     train_step=train_step)

  def student_steps(state, xs, ys, ts):
    state, metrics = jax.lax.scan(lambda state, inputs: train_step(state, *inputs), state,
                                  (xs, ys, ts))
    return state, jax.tree.map(lambda m: m.sum(0), metrics)

  xs, ys = jax.vmap(batch)(jnp.arange(num_steps))
  if teacher is None:
    return student_steps(state, xs, ys, None)
  targets = functools.partial(_dispatch_teacher_targets, teacher, batch_sharding=batch_sharding,
                              config=config)
  groups = config.teacher_stream_groups
  if groups > 1 and num_steps % groups == 0:
    state, metrics, hits = _steps_beside_teacher(state, teacher_vars, xs, ys, groups=groups,
                                                 student_steps=student_steps, targets=targets)
  else:
    ts, hits = targets(teacher_vars, xs, ys)
    state, metrics = student_steps(state, xs, ys, ts)
  return state, {**metrics, "teacher_top1": hits}


def _steps_beside_teacher(state: TrainState, teacher_vars, xs: jax.Array, ys: jax.Array, *,
                          groups: int, student_steps: Callable, targets: Callable):
  """A dispatch's steps in `groups` groups, the teacher's targets for group g+1 computed on a
  second GPU stream while the student trains on group g (`config.teacher_stream_groups`).

  An experiment for small batches on a GPU: the student's small kernels leave much of it idle,
  which the teacher's convolutions might fill. XLA ignores the stream on other backends; the
  numbers are those of the teacher run on the whole dispatch at once, but for rounding.
  """
  split = lambda a: a.reshape(groups, -1, *a.shape[1:])
  xs, ys = split(xs), split(ys)
  targets_on_side_stream = _on_gpu_stream()(jax.jit(targets))
  ts, hits = targets(teacher_vars, xs[0], ys[0])

  def group(carry, inputs):
    state, ts, hits = carry
    x, y, x_next, y_next = inputs
    ts_next, next_hits = targets_on_side_stream(teacher_vars, x_next, y_next)
    state, metrics = student_steps(state, x, y, ts)
    return (state, ts_next, hits + next_hits), metrics

  (state, ts, hits), metrics = jax.lax.scan(group, (state, ts, hits),
                                            (xs[:-1], ys[:-1], xs[1:], ys[1:]))
  state, last = student_steps(state, xs[-1], ys[-1], ts)
  return state, jax.tree.map(lambda m, l: m.sum(0) + l, metrics, last), hits


def _on_gpu_stream() -> Callable[[Callable], Callable] | None:
  """A wrapper that puts a function's computation on GPU stream 1 (other backends ignore it), or
  None in a JAX without one. It is JAX's experimental `jax.experimental.compute_on`, reshaped
  between versions: the context manager `compute_on(type)`; `compute_on2(f, *, compute_type,
  out_memory_spaces)` beside it (0.10.2, the pinned version); that function alone, named
  `compute_on` (later versions). Imported only for `config.teacher_stream_groups`, so that the
  trainer runs on any JAX."""
  try:
    from jax.experimental import compute_on as api  # noqa: PLC0415
  except ImportError:
    return None
  for name in ("compute_on2", "compute_on"):
    wrap = getattr(api, name, None)
    if wrap is not None and "out_memory_spaces" in inspect.signature(wrap).parameters:
      return wrap(compute_type="gpu_stream:1", out_memory_spaces=jax.memory.Space.Device)
  if hasattr(api, "compute_on"):
    return api.compute_on("gpu_stream:1")  # a context manager, used as a decorator
  return None


def _train_batch(state: TrainState, teacher_vars, images, labels, *, batch_sharding,
                 compute_dtype, teacher, config, train_step):
  """One step on a device batch already cropped and flipped by tf.data (ImageNet)."""
  x = jax.lax.with_sharding_constraint(
      augment.normalize(images, *augment.PIPELINE_STATS["tf_data"], compute_dtype),
      batch_sharding)
  return _one_step(state, x, labels, teacher=teacher, teacher_vars=teacher_vars, config=config,
                   train_step=train_step)


# ----------------------------------------------------------------------------- set-up


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype must be 'float32' or 'bfloat16', got {config.dtype!r}.")
  return jnp.dtype(config.dtype)


def split_student(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.GraphDef, PyTree, PyTree]:
  """Train- and eval-mode graphdefs of the student, and its params and BN statistics."""
  model.eval()
  eval_graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.train()
  train_graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return (train_graphdef, eval_graphdef, nnx.to_pure_dict(params),
          nnx.to_pure_dict(batch_stats))


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Independent keys for the student's initialisation, the augmentation (folded with the
  step) and the epoch permutations (folded with the epoch): one root, split once."""
  init_key, augment_key, permutation_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  return init_key, augment_key, permutation_key


def epoch_permutation(seed: int, epoch: int | jax.Array, num_examples: int) -> jax.Array:
  """The order in which epoch `epoch` visits the examples: each once, in a new order every
  epoch (spec §7.3 shuffle), the same again when a run resumes."""
  return jax.random.permutation(jax.random.fold_in(run_keys(seed)[2], epoch), num_examples)


def create_train_state(config: ml_collections.ConfigDict, num_classes: int,
                       optimizer: optax.GradientTransformation
                       ) -> tuple[TrainState, nnx.GraphDef, nnx.GraphDef]:
  """A fresh student (reference initialisation) and optimizer state.

  Built by one compiled program: run eagerly, every initialiser draw and optimizer buffer of a
  new shape would be an XLA compilation of its own (36 for resnet8x4).
  """
  dtype = compute_dtype(config)

  def init(key: jax.Array) -> TrainState:
    student = models.create_model(config.student.name, num_classes, rngs=nnx.Rngs(key),
                                  dtype=dtype)
    params, batch_stats = split_student(student)[2:]
    params = {"student": params, **methods.init_params(config)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=optimizer.init(params))

  train_graphdef, eval_graphdef = split_student(
      models.abstract_model(config.student.name, num_classes, dtype=dtype))[:2]
  return jax.jit(init)(run_keys(config.seed)[0]), train_graphdef, eval_graphdef


def check_divisible_by_devices(batch_size: int, num_devices: int, what: str) -> None:
  """A training batch is split evenly over the devices (evaluation pads instead)."""
  if batch_size % num_devices:
    raise ValueError(f"{what} {batch_size} is not divisible by the {num_devices} devices; "
                     f"choose a multiple of {num_devices}.")


def default_steps_per_dispatch() -> int:
  """Steps per dispatch when the config says None: 32 on accelerators, 1 on CPU.

  Several steps in one `lax.scan` hide the dispatch overhead of small steps on GPUs/TPUs (H200,
  batch 64 fp32: 28,299 / 29,575 / 30,827 / 31,029 img/s at 8 / 16 / 32 / 64 steps, README);
  on XLA:CPU convolutions inside a loop run over ten times slower than at top level.
  """
  return 1 if jax.default_backend() == "cpu" else 32


def warn_if_slow_on_cpu(steps_per_dispatch: int) -> None:
  """Several steps per dispatch on a CPU are a GPU setting copied over: say what it costs."""
  if steps_per_dispatch > 1 and jax.default_backend() == "cpu":
    logging.warning(
        "%d steps per dispatch on a CPU: XLA:CPU runs the convolutions inside that loop over "
        "ten times slower than one step per dispatch; leave config.steps_per_dispatch "
        "(benchmark.py: --steps-per-dispatch) unset on a CPU.", steps_per_dispatch)


def epoch_plan(num_examples: int, batch_size: int, num_devices: int,
               steps_per_dispatch: int | None) -> list[tuple[int, int, int]]:
  """An epoch as dispatches (num_steps, batch_size, first example index in the permutation).

  Chunks of `steps_per_dispatch` full batches, then the smaller last batch, so every image is
  used once per epoch as in mdistiller (drop_last=False). The last batch is rounded down to a
  multiple of the device count: fewer than `num_devices` images of an epoch are left out.
  """
  full_steps, remainder = divmod(num_examples, batch_size)
  remainder -= remainder % num_devices
  chunk = max(1, int(steps_per_dispatch or default_steps_per_dispatch()))
  plan = [(min(chunk, full_steps - i), batch_size, i * batch_size)
          for i in range(0, full_steps, chunk)]
  if remainder:
    plan.append((1, remainder, full_steps * batch_size))
  if not plan:  # fewer images than devices: a smaller batch would not help
    raise ValueError(f"The training split has {num_examples} images, fewer than the "
                     f"{num_devices} devices, each of which takes at least one per step: train "
                     "on more images (config.data.max_train_examples) or fewer devices.")
  return plan


def build_train_chunk(config: ml_collections.ConfigDict, mesh: Mesh, *, train_step: Callable,
                      teacher: evaluation.Network | None) -> Callable:
  """The jitted, state-donating `(state, teacher_vars, images, labels, perm, start) ->
  (state, metric sums)` over `num_steps` steps of `batch_size` (both static); `train_step` is
  `make_train_step`'s."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(
      functools.partial(
          _train_chunk, batch_sharding=NamedSharding(mesh, P("data")),
          # A host constant: derived inside the step, the key's split would run every dispatch.
          augment_key=np.asarray(run_keys(config.seed)[1]), compute_dtype=compute_dtype(config),
          config=config, train_step=train_step, teacher=teacher),
      static_argnames=("num_steps", "batch_size"), donate_argnums=(0,),
      out_shardings=replicated)


def build_train_batch(config: ml_collections.ConfigDict, mesh: Mesh, *, train_step: Callable,
                      teacher: evaluation.Network | None) -> Callable:
  """The jitted, state-donating `(state, teacher_vars, images, labels) -> (state, metric sums)`
  of one step on a device batch of uint8 images cropped by tf.data (ImageNet)."""
  return jax.jit(
      functools.partial(
          _train_batch, batch_sharding=NamedSharding(mesh, P("data")),
          compute_dtype=compute_dtype(config), config=config, train_step=train_step,
          teacher=teacher),
      donate_argnums=(0,), out_shardings=NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------- the job


PIPELINES = ("on_device", "tf_data")


@dataclasses.dataclass
class _Feed:
  """How one run gets its batches: the steps of an epoch, and the test-set evaluator."""
  num_classes: int
  steps_per_epoch: int
  # What each checkpoint records of the data, for `workdirs.check_same_data`: the train images
  # per epoch and test images per evaluation, and, held on the device, a CRC of each split.
  data_record: dict[str, int]
  evaluate: Callable[[evaluation.Network, PyTree], dict[str, float]]
  # (state, teacher, teacher_vars, train_step) -> ((state, epoch) -> iterator of (state,
  # metric sums, steps taken, images trained on)): built once the state exists, the step being
  # compiled for it.
  epoch_runner: Callable[..., Callable[[TrainState, int],
                                       Iterator[tuple[TrainState, PyTree, int, int]]]]


def _on_device_feed(config, mesh, batch_size) -> _Feed:
  """CIFAR-sized splits held on the device, augmented inside the dispatch (the default).

  With several processes each one loads the whole split (identical on all), so the global
  batch is gathered on the device from the replicated split, with no per-process input.
  """
  train_split, test_split = input_pipeline.load_splits(config.data)
  n = len(train_split.labels)
  plan = epoch_plan(n, batch_size, mesh.size, config.steps_per_dispatch)
  warn_if_slow_on_cpu(plan[0][0])
  steps_per_epoch = sum(k for k, _, _ in plan)
  left_out = n - sum(k * b for k, b, _ in plan)
  logging.info("%d train / %d test images, %d classes; %d steps per epoch%s.", n,
               len(test_split.labels), train_split.num_classes, steps_per_epoch,
               f" (each leaves out {left_out} images: its last batch is rounded down to a "
               f"multiple of the {mesh.size} devices)" if left_out else "")

  def epoch_runner(state, teacher, teacher_vars, train_step):
    replicated = NamedSharding(mesh, P())
    images, labels = distributed.replicate((train_split.images, train_split.labels), mesh)
    permutation = jax.jit(functools.partial(epoch_permutation, config.seed, num_examples=n),
                          out_shardings=replicated)
    chunk = build_train_chunk(config, mesh, train_step=train_step, teacher=teacher)
    # Where each dispatch starts in the permutation: the same every epoch.
    starts = distributed.replicate([np.int32(start) for _, _, start in plan], mesh)
    t = time.perf_counter()
    args = (state, teacher_vars, images, labels, permutation(1), starts[0])
    if _debugging_jax():  # they re-run the step op by op, which a compiled one cannot
      compiled = {(k, b): functools.partial(chunk, num_steps=k, batch_size=b)
                  for k, b, _ in plan}
    else:
      compiled = {(k, b): chunk.lower(*args, num_steps=k, batch_size=b).compile()
                  for k, b, _ in plan}
      logging.info("Compiled the train step for %d dispatch shapes in %.1f s.", len(compiled),
                   time.perf_counter() - t)

    def run_epoch(state, epoch):
      perm = permutation(epoch)
      for (k, b, _), start in zip(plan, starts):
        state, metrics = compiled[k, b](state, teacher_vars, images, labels, perm, start)
        yield state, metrics, k, k * b

    return run_epoch

  evaluate, _ = evaluation.make_test_evaluator(config, mesh, dtype=compute_dtype(config),
                                               test_split=test_split)
  data_record = {"train_examples": n, "test_examples": len(test_split.labels),
                 "train_crc32": train_split.crc32(), "test_crc32": test_split.crc32()}
  return _Feed(train_split.num_classes, steps_per_epoch, data_record, evaluate, epoch_runner)


def _debugging_jax() -> bool:
  """JAX's debugging switches (jax_disable_jit, jax_debug_nans, jax_debug_infs) are on."""
  return bool(jax.config.jax_disable_jit or jax.config.jax_debug_nans
              or jax.config.jax_debug_infs)


def _streaming_feed(config, mesh, batch_size) -> _Feed:
  """ImageNet: tf.data batches of this process's shard, prefetched to the device."""
  d = config.data
  source = data_sources.stream_source(d)
  total, num_classes = data_sources.split_info(split=d.train_split, **source)
  n = total if d.max_train_examples is None else min(total, d.max_train_examples)
  steps_per_epoch = math.ceil(n / batch_size)
  batch_sharding = NamedSharding(mesh, P("data"))
  logging.info("%d train images%s, %d classes; %d steps per epoch.", n,
               f" per epoch (of {total})" if n < total else "", num_classes, steps_per_epoch)

  def epochs_from(first: int) -> Iterator[dict[str, jax.Array]]:
    """The batches of epochs `first`..`num_epochs`, one tf.data stream: epoch e is the start of
    a stream seeded by e alone, so a resumed run sees the same batches."""
    start = time.perf_counter()
    ds = imagenet_input.imagenet_train_epochs(
        seeds=[config.seed * 100_003 + epoch for epoch in range(first, config.num_epochs + 1)],
        steps_per_epoch=steps_per_epoch, global_batch_size=batch_size, split=d.train_split,
        shuffle_buffer=d.shuffle_buffer, image_size=d.image_size, **source)
    logging.info("Built the tf.data train stream of epochs %d-%d in %.1f s.", first,
                 config.num_epochs, time.perf_counter() - start)
    batches = imagenet_input.naming_undecodable(ds.as_numpy_iterator(), split=d.train_split,
                                                **source)
    return distributed.prefetch_to_device(batches, 2, batch_sharding)

  def epoch_runner(state, teacher, teacher_vars, train_step):
    step = build_train_batch(config, mesh, train_step=train_step, teacher=teacher)
    stream, next_epoch = None, None

    def run_epoch(state, epoch):
      nonlocal stream, next_epoch
      if stream is None:
        stream, next_epoch = epochs_from(epoch), epoch
      assert epoch == next_epoch, (epoch, next_epoch)  # epochs run in order
      next_epoch += 1
      for batch in itertools.islice(stream, steps_per_epoch):
        state, metrics = step(state, teacher_vars, batch["image"], batch["label"])
        yield state, metrics, 1, batch_size

    return run_epoch

  evaluate, _ = evaluation.make_test_evaluator(config, mesh, dtype=compute_dtype(config))
  num_test, _ = data_sources.split_info(split=d.test_split, **source)
  data_record = {"train_examples": n,
                 "test_examples": min(num_test, d.max_test_examples or num_test)}
  return _Feed(num_classes, steps_per_epoch, data_record, evaluate, epoch_runner)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.student` by `config.method` (+Sort), evaluating after every epoch.

  Re-running with the same workdir resumes from the latest checkpoint. Returns a summary:
  best test top-1 and its epoch, last test top-1 and the final state (NumPy), a finished run's
  too. A leading `~` is the home folder, as in the data paths: a quoted `--workdir '~/runs/x'`
  made a folder named `~`.
  """
  workdir = os.path.expanduser(workdir)
  workdirs.check_place(workdir, config.data)
  with workdirs.lock(workdir), out_of_memory_explained(config):
    return _train_and_evaluate(config, workdir)


@contextlib.contextmanager
def out_of_memory_explained(config: ml_collections.ConfigDict, *,
                            training: bool = True) -> Iterator[None]:
  """XLA's out-of-memory error, said with the settings that size what the device holds (for
  `scripts/eval.py`, `training=False`, the evaluation's batch alone)."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    first = (str(e).strip().splitlines() or [""])[0]
    # GPU: "Out of memory while trying to allocate", or with XLA's platform allocator "Failed to
    # allocate request for"; TPU: "Ran out of memory in memory space hbm", "Error allocating".
    if not (first.startswith("RESOURCE_EXHAUSTED")
            and ("memory" in first.lower() or "allocat" in first.lower())):
      raise
    evaluation_batch = f"config.eval_batch_size ({config.eval_batch_size})"
    if not training:
      advice = f"The evaluation holds batches of its images: lower {evaluation_batch}"
    elif config.data.pipeline == "tf_data":
      advice = (f"A step holds its batch of {config.batch_size} images' activations: lower "
                f"config.batch_size (another recipe); in the evaluation, {evaluation_batch}")
    else:
      steps = config.steps_per_dispatch or default_steps_per_dispatch()
      advice = (f"A dispatch (up to {steps} × {config.batch_size} images) holds all its steps' "
                "images and the teacher's activations for them at once: lower "
                "config.steps_per_dispatch (which changes results only by float rounding), then "
                f"config.batch_size (another recipe); in the evaluation, {evaluation_batch}")
    raise RuntimeError(f"The device ran out of memory ({first}). {advice}. "
                       "config.dtype='bfloat16' halves the activations.") from e


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  launched = time.perf_counter()
  check_config(config)
  distributed.check_same_launch(workdirs.launch_identity(config, workdir))
  config_changes = workdirs.check_resumable(config, workdir)
  if (checkpoint.latest_saved_epoch(workdir) or 0) >= config.num_epochs:
    return _finished_run(config, workdir)
  for unreached in schedule_cut_short(config):
    logging.warning("config.num_epochs=%d ends the run before %s; if the shorter run is meant "
                    "to follow the recipe's schedule, set that field for it.",
                    config.num_epochs, unreached)
  uses_teacher = methods.uses_teacher(config)
  if uses_teacher:
    teachers.check_teacher_exists(config.teacher, config.data)
  dtype = compute_dtype(config)
  mesh = distributed.make_mesh()
  batch_size = config.batch_size
  check_divisible_by_devices(batch_size, mesh.size, "config.batch_size")
  logging.info("%d devices (%s), %d processes.", mesh.size, jax.devices()[0].device_kind,
               jax.process_count())

  streaming = config.data.pipeline == "tf_data"
  feed = (_streaming_feed if streaming else _on_device_feed)(config, mesh, batch_size)
  steps_per_epoch = feed.steps_per_epoch
  optimizer = make_optimizer(config, steps_per_epoch)
  state, train_graphdef, eval_graphdef = create_train_state(config, feed.num_classes, optimizer)
  teacher, teacher_vars, teacher_checksum, teacher_epoch = None, None, None, None
  if uses_teacher:
    teacher_model, teacher_checksum, teacher_epoch = teachers.load_teacher(
        config.teacher, feed.num_classes, image_size=config.data.image_size, dtype=dtype)
    teacher, teacher_vars = evaluation.freeze(teacher_model)

  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, checkpoint.TRAIN_CHECKPOINT_DIR),
                                      keep=config.checkpoints_to_keep,
                                      delete_unfinished_saves=True)
  state, start_epoch, best_top1, best_epoch = _resume(ckpt, state, config, feed,
                                                      teacher_checksum)
  workdirs.write_config(config, workdir)  # only now: a refused or failed start keeps the old one

  state, teacher_vars = distributed.replicate((state, teacher_vars), mesh)
  train_step = make_train_step(config, student_graphdef=train_graphdef, optimizer=optimizer,
                               steps_per_epoch=steps_per_epoch)
  run_epoch = feed.epoch_runner(state, teacher, teacher_vars, train_step)

  schedule = jax.jit(learning_rate_schedule(config, steps_per_epoch))  # one program, not one per op
  step = int(distributed.to_host(state.step))
  reporter = reporting.Reporter(workdir, config.num_epochs * steps_per_epoch, start_step=step)
  images = 0  # trained on since this (re)start, for images/s
  sums = _MetricSums()
  last_top1 = None

  def train_averages(window: collections.Counter) -> dict[str, float]:
    averages = _averages(window)
    _stop_unless_finite(averages["loss"], "training loss", epoch=epoch, step=step, ckpt=ckpt)
    return averages

  def write_window() -> None:
    averages = train_averages(sums.take_window())  # waits for the window's steps to finish,
    img_s, eta = reporter.throughput(step, images)  # so that their time is in this window
    reporter.write("train", epoch, step, {**averages, "lr": _written_lr(schedule(step - 1)),
                                          "img_per_s": img_s, "eta_s": eta})

  epoch = start_epoch
  try:
    reporter.write_start(start_epoch, step, config_changes)
    if teacher is not None and step == 0:  # the teacher's accuracy, on record with the run's
      source = os.path.abspath(os.path.expanduser(config.teacher.checkpoint))
      _record_teacher(config, feed, teacher, teacher_vars, reporter,
                      {"checkpoint": source, "run_epoch": teacher_epoch,
                       "logits_checksum": teacher_checksum})
    for epoch in range(start_epoch, config.num_epochs + 1):
      epoch_start = time.perf_counter()
      if epoch > start_epoch:  # compiled by now: the epoch's first dispatch counts too
        reporter.start_timing(step, images)
      for state, metrics, num_steps, num_images in run_epoch(state, epoch):
        ckpt.check_background_save()
        sums.add(metrics)
        step += num_steps
        images += num_images
        if not reporter.timing:  # throughput leaves out compilation, evaluation and saving
          jax.block_until_ready(metrics)
          reporter.start_timing(step, images)
          logging.info("First dispatch done %.1f s after the start (data, models, "
                       "compilation).", time.perf_counter() - launched)
        if step // config.log_every_steps > (step - num_steps) // config.log_every_steps:
          write_window()
      if sums.window_open():  # windows end with their epoch too, so a resumed run logs the same
        write_window()
      epoch_metrics = train_averages(sums.take_epoch())
      test = feed.evaluate(evaluation.Network(eval_graphdef),
                           (state.params["student"], state.batch_stats))
      # Eval-mode BatchNorm uses the running statistics, which the training loss never sees.
      _stop_unless_finite(test["test_loss"],
                          f"test loss (training loss {epoch_metrics['loss']:.4g})",
                          "The student's BatchNorm running statistics have probably diverged. ",
                          epoch=epoch, step=step, ckpt=ckpt)
      last_top1 = test["test_top1"]
      if best_epoch is None or last_top1 >= best_top1:  # a tie: the latest, as checkpoints keep
        best_top1, best_epoch = last_top1, epoch
      reporter.write("epoch", epoch, step, {
          **{f"train_{k}": v for k, v in epoch_metrics.items()}, **test,
          "best_top1": best_top1, "best_epoch": best_epoch,
          "lr": _written_lr(schedule(step - 1)), "epoch_time_s": time.perf_counter() - epoch_start})
      student_checksum = checkpoint.logits_checksum(
          config.student.name, feed.num_classes, state.params["student"], state.batch_stats)
      ckpt.save(epoch, state, {"best_top1": best_top1, "test_top1": last_top1, "step": step,
                               "arch": config.student.name, "num_classes": feed.num_classes,
                               "logits_checksum": student_checksum,
                               "teacher_logits_checksum": teacher_checksum,
                               "teacher_run_epoch": teacher_epoch, **feed.data_record})
      reporter.stop_timing()
    reporter.write("end", epoch, step, {"best_top1": best_top1, "best_epoch": best_epoch,
                                        "last_top1": last_top1})
  except KeyboardInterrupt:
    _finish_interrupted(ckpt, workdir, epoch)
    raise
  finally:
    ckpt.close()
    reporter.close()

  logging.info("Best test top-1 %.2f (epoch %d), last %.2f.", best_top1, best_epoch, last_top1)
  return {"best_top1": best_top1, "best_epoch": best_epoch, "last_top1": last_top1,
          "state": distributed.to_host(state)}


def _written_lr(lr: jax.Array) -> float:
  """The optimizer's float32 learning rate as the shortest decimal that reads back as it:
  0.05, as in config.json, not 0.05000000074505806 (runs grouped by lr did not match)."""
  return float(str(np.float32(lr)))


def _resume(ckpt: checkpoint.TrainCheckpointer, state: TrainState,
            config: ml_collections.ConfigDict, feed: _Feed,
            teacher_checksum: dict[str, Any] | None
            ) -> tuple[TrainState, int, float, int | None]:
  """(state, first epoch to run, best test top-1 so far and its epoch): from the latest
  checkpoint, once it is checked to be this run's (student bits, steps per epoch, teacher),
  else the fresh state."""
  latest = ckpt.latest_epoch()
  if latest is None:
    return state, 1, 0.0, None
  state, meta = ckpt.restore(latest, state)
  ckpt.check_student(latest, meta, state.params["student"], state.batch_stats)
  workdirs.check_steps_per_epoch(int(distributed.to_host(state.step)), latest,
                                 feed.steps_per_epoch)
  workdirs.check_same_data(latest, meta, feed.data_record)
  workdirs.check_same_teacher(config.teacher.checkpoint, meta, teacher_checksum,
                              feed.num_classes)
  logging.info("Resuming from %s at epoch %d (best top-1 so far %.2f).", ckpt.directory,
               latest + 1, meta["best_top1"])
  return state, latest + 1, meta["best_top1"], ckpt.best_epoch()


class _MetricSums:
  """The train metrics' sums: per dispatch on the device (no host sync per step) until a log
  window ends, then on the host, over the window and over the epoch."""

  def __init__(self):
    self._pending = []
    self._window, self._epoch = collections.Counter(), collections.Counter()

  def add(self, metric_sums: PyTree) -> None:
    self._pending.append(metric_sums)

  def window_open(self) -> bool:
    """Whether steps were taken since the last window was taken."""
    return bool(self._pending or self._window)

  def take_window(self) -> collections.Counter:
    self._fetch()
    window, self._window = self._window, collections.Counter()
    return window

  def take_epoch(self) -> collections.Counter:
    self._fetch()
    epoch, self._epoch = self._epoch, collections.Counter()
    return epoch

  def _fetch(self) -> None:
    """Moves the pending sums to the host, each once."""
    if self._pending:
      sums = distributed.sum_on_host(self._pending)
      self._pending.clear()
      self._window.update(sums)
      self._epoch.update(sums)


def _averages(sums: collections.Counter) -> dict[str, float]:
  """Per-example averages of metric sums (with their 'count'); accuracies in percent."""
  out = {k: v / sums["count"] for k, v in sums.items() if k != "count"}
  for k in ("top1", "teacher_top1"):
    if k in out:
      out[k] *= 100
  return out


def _stop_unless_finite(loss: float, what: str, cause: str = "", *, epoch: int, step: int,
                        ckpt: checkpoint.TrainCheckpointer) -> None:
  """Stops the run on a NaN or infinite loss, before anything of it is saved."""
  if math.isfinite(loss):
    return
  good = ckpt.latest_epoch()
  kept, where = ((f"The checkpoint of epoch {good}, the last with a finite loss, stays in "
                  f"{ckpt.directory}.", "in a new --workdir: a workdir resumes only with its "
                  "own config") if good else
                 ("No epoch finished, so there is no checkpoint.",
                  "this --workdir takes any config until an epoch is saved"))
  raise FloatingPointError(
      f"The {what} is {loss} in epoch {epoch} (step {step}): stopping. {kept} {cause}Check "
      f"the data and the teacher, or lower config.lr ({where}).")


def _record_teacher(config: ml_collections.ConfigDict, feed: _Feed, teacher: evaluation.Network,
                    teacher_vars: PyTree, reporter: reporting.Reporter,
                    source: dict[str, Any]) -> None:
  """Logs the teacher's test accuracy at step 0, with `source` (where it was loaded from: the
  checkpoint, the epoch of a run, the logits checksum), and refuses a teacher whose outputs are
  not finite (damaged weights) before any step is taken."""
  teacher_test = feed.evaluate(teacher, teacher_vars)
  reporter.write("teacher", 0, 0, {"arch": config.teacher.name, **source, **teacher_test})
  if not math.isfinite(teacher_test["test_loss"]):
    raise FloatingPointError(
        f"The teacher's test loss is {teacher_test['test_loss']}: its outputs are not finite, "
        f"so its weights are damaged ({config.teacher.checkpoint}). Convert or copy the "
        "teacher again.")


def _finish_interrupted(ckpt: checkpoint.TrainCheckpointer, workdir: str, epoch: int) -> None:
  """On Ctrl-C: lets a save in flight finish (unless Ctrl-C is pressed again), then says where
  the same command resumes."""
  try:
    ckpt.close()
  finally:
    saved = checkpoint.latest_saved_epoch(workdir)
    logging.warning("Interrupted in epoch %d. %s", epoch, (
        f"Re-run the same command to resume after epoch {saved}, the last saved." if saved
        else "No epoch had finished, so nothing is saved: the same command starts the run "
        "over."))


def _finished_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The result of a run that has saved all its epochs, from its latest checkpoint (its layout
  and bits checked as on a resume): it needs neither its data nor its teacher, which may be
  gone by now."""
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, checkpoint.TRAIN_CHECKPOINT_DIR))
  try:
    latest = ckpt.latest_epoch()
    meta = ckpt.read_meta(latest)
    # The run's own schedule, though only the optimizer state's structure matters here.
    optimizer = make_optimizer(config, steps_per_epoch=meta["step"] // latest)
    state = create_train_state(config, meta["num_classes"], optimizer)[0]
    state, meta = ckpt.restore(latest, state)
    ckpt.check_student(latest, meta, state.params["student"], state.batch_stats)
    best_epoch = ckpt.best_epoch()
  finally:
    ckpt.close()
  done = (f"has finished its {latest} epochs" if latest == config.num_epochs else
          f"has run {latest} epochs, more than --config.num_epochs={config.num_epochs}")
  logging.info("The run in %s %s (best top-1 %.2f); raise --config.num_epochs above %d to "
               "continue it.", workdir, done, meta["best_top1"], latest)
  return {"best_top1": meta["best_top1"], "best_epoch": best_epoch,
          "last_top1": meta["test_top1"], "state": distributed.to_host(state)}


def schedule_cut_short(config: ml_collections.ConfigDict) -> list[str]:
  """What of the recipe's schedule `config.num_epochs` never reaches: an lr decay, DKD's
  warm-up, CTKD's λ ramp. mdistiller is silent about it, so a run shortened to
  `--config.num_epochs=100` on a 240-epoch CIFAR recipe trained at a constant lr unawares."""
  epochs, unread = config.num_epochs, methods.unread_fields(config)
  unreached = []
  late = [e for e in config.lr_decay_epochs if e >= epochs]  # the lr decays after epoch e
  if late:
    unreached.append(f"the lr decays after epoch {', '.join(map(str, late))} "
                     f"(config.lr_decay_epochs={tuple(config.lr_decay_epochs)})")
  if "dkd" not in unread and config.dkd.warmup_epochs > epochs:
    unreached.append(f"DKD's loss has its full weight, at epoch {config.dkd.warmup_epochs} "
                     "(config.dkd.warmup_epochs)")
  if config.method == "ctkd" and config.ctkd.ramp_epochs > epochs:
    unreached.append(f"CTKD's λ reaches 1, at epoch {config.ctkd.ramp_epochs} "
                     "(config.ctkd.ramp_epochs)")
  return unreached


def check_config(config: ml_collections.ConfigDict, *, training: bool = True) -> None:
  """Fails early, before anything is read or written, on a bad method, model name, pipeline,
  size or optimiser setting. `training=False` (an evaluation) leaves out what only training
  reads: a run's config.json may hold settings refused since (say, checkpoints_to_keep=0)."""
  if training:
    methods.validate(config)
  models.check_name(config.student.name, "config.student.name")
  if methods.uses_teacher(config):
    models.check_name(config.teacher.name, "config.teacher.name")
  if config.data.pipeline not in PIPELINES:
    raise ValueError(f"Unknown config.data.pipeline {config.data.pipeline!r}; choose one of "
                     f"{PIPELINES}.")
  if config.data.pipeline == "tf_data" and "shuffle_buffer" not in config.data:
    raise ValueError("config.data.pipeline='tf_data' is the ImageNet recipes' stream (random-"
                     "resized crops, data.shuffle_buffer, data.manual_dir); this config's data "
                     "is CIFAR-sized: keep 'on_device', or use a configs/imagenet_*.py recipe.")
  for key in ("folder", "data_dir", "cache_dir", "manual_dir"):  # `--config.data.folder=`
    value = config.data.get(key)
    if isinstance(value, str) and not value.strip():  # read as the current folder
      raise ValueError(f"config.data.{key} is empty: name a folder, or leave it unset (None).")
  sizes = {key: config[key] for key in ("batch_size", "eval_batch_size", "num_epochs",
                                        "log_every_steps")}
  if config.steps_per_dispatch is not None:
    sizes["steps_per_dispatch"] = config.steps_per_dispatch
  sizes.update({f"data.{key}": config.data[key] for key in ("image_size", "max_train_examples",
                                                            "max_test_examples", "shuffle_buffer")
                if config.data.get(key) is not None})
  for key, value in sizes.items():
    if not (isinstance(value, int) and value > 0):
      raise ValueError(f"config.{key} must be a positive integer, got {value!r}.")
  decay = config.lr_decay_epochs
  if not (isinstance(decay, (tuple, list)) and all(isinstance(e, int) and e > 0 for e in decay)
          and all(a < b for a, b in zip(decay, decay[1:]))):
    raise ValueError("config.lr_decay_epochs must be increasing positive epochs, e.g. "
                     f"'--config.lr_decay_epochs=(150,180,210)', got {decay!r}.")
  if not training:
    return
  # JAX's keys keep the low 32 bits of a seed: 2**32 trained as 0 did, and -1 as 2**32 - 1.
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not (
      0 <= config.seed < 2**32):
    raise ValueError(f"config.seed must be an integer in [0, 2**32), got {config.seed!r}.")
  if config.data.pipeline == "tf_data" and (config.steps_per_dispatch or 1) > 1:
    raise ValueError("config.steps_per_dispatch is for the on-device (CIFAR) data: the tf_data "
                     "pipeline runs one step per dispatch, got "
                     f"{config.steps_per_dispatch}. Leave it unset.")
  groups = config.teacher_stream_groups
  steps = (1 if config.data.pipeline == "tf_data"
           else config.steps_per_dispatch or default_steps_per_dispatch())
  if not (isinstance(groups, int) and groups > 0 and steps % groups == 0):
    raise ValueError(f"config.teacher_stream_groups must be a positive integer that divides the "
                     f"{steps} steps of a dispatch (config.steps_per_dispatch, unset: 32 on "
                     "GPUs/TPUs, 1 on CPUs; one step with data.pipeline='tf_data'), got "
                     f"{groups!r}.")
  if groups > 1 and _on_gpu_stream() is None:
    raise ValueError(f"config.teacher_stream_groups={groups} needs jax.experimental.compute_on "
                     f"(a GPU stream annotation), which JAX {jax.__version__} does not have: "
                     "leave it at 1.")
  # Out of range, these lost epochs (0 kept the best alone, -1 broke the next save) or trained
  # on, diverging (gradient ascent, growing weights), without a word.
  ranges = {"checkpoints_to_keep": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
            "lr": (lambda v: v > 0, "positive"),
            "lr_decay_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "weight_decay": (lambda v: v >= 0, "at least 0"),
            "momentum": (lambda v: 0 <= v < 1, "in [0, 1)")}
  for key, (valid, wanted) in ranges.items():
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
      raise ValueError(f"config.{key} must be {wanted}, got {value!r}.")
    if not math.isfinite(value):
      raise ValueError(f"config.{key} must be a finite number, got {value!r}.")
