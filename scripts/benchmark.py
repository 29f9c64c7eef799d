r"""Throughput of the real training step (and of evaluation) on synthetic data.

  python scripts/benchmark.py --config configs/cifar_kd.py:res32x4_res8x4 \
      --batch-size 64 --steps-per-dispatch 16
  python scripts/benchmark.py --config configs/cifar_kd.py:res32x4_res8x4 \
      --batch-size 2048 --dtype bfloat16
  python scripts/benchmark.py --config configs/imagenet_kd.py:r34_r18 \
      --config.data.folder=DIR --dtype bfloat16

What is timed is the function the trainer runs. CIFAR recipes: gather from the on-device split,
crop/flip/normalise, frozen teacher forward, Sort, the method's loss, student forward/backward and
the SGD update, `--steps-per-dispatch` steps per dispatch. ImageNet (tf.data) recipes: the same
step, one per dispatch, on a device batch already cropped (uint8, `config.data.image_size`), and
then, apart, this host's tf.data input pipeline (decode, random-resized crop, flip, batch) on the
config's data; `--noinput` leaves it out and needs no data. Compilation and warm-up are reported
separately; each figure is the median of `--windows` timed windows. `--breakdown` also times the
parts on their own (teacher forward, student step without teacher, Sort, on-device augmentation).
`--profile DIR` traces a few dispatches with `jax.profiler` (open DIR in TensorBoard or Perfetto)
and reports where the device time goes: time inside XLA ops against wall time (the rest is launch
gaps and host work) and the op kinds that take it (cudnn-conv, fusions, ...). Prints one JSON
object per measurement, then a table. Needs neither TensorFlow nor data, except to time an input
pipeline.
"""

import collections
import dataclasses
import datetime
import functools
import glob
import gzip
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from sortkd_jax import (augment, cli, data_sources, distributed, evaluation,  # noqa: E402
                        imagenet_input, methods, models, reporting, train)

cli.define_config_flag(os.path.join(REPO, "configs", "cifar_kd.py:res32x4_res8x4"),
                       "Recipe whose method, models and loss are benchmarked.")
flags.DEFINE_integer("batch-size", None, "Global batch size (default: the config's).",
                     lower_bound=1)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: config's).")
flags.DEFINE_integer("steps-per-dispatch", None, "Steps per dispatch (default: config's).",
                     lower_bound=1)
flags.DEFINE_integer("num-examples", 50_000, "Size of the synthetic training split (CIFAR "
                     "recipes; it sets the steps per epoch of ImageNet ones).", lower_bound=1)
flags.DEFINE_integer("num-classes", None, "Classes of the synthetic data (default: the "
                     "student's, 100 for CIFAR models, 1000 for imagenet_*).", lower_bound=2)
flags.DEFINE_integer("windows", 5, "Timed windows; the median is reported.", lower_bound=1)
flags.DEFINE_float("window-seconds", 2.0, "Approximate length of one timed window.",
                   lower_bound=0.0)
flags.DEFINE_boolean("eval", True, "Also time evaluation (up to 10,000 images).")
flags.DEFINE_boolean("breakdown", False, "Also time the step's parts on their own.")
flags.DEFINE_string("json", None, "Also append the JSON lines to this file.")
flags.DEFINE_string("profile", None, "Trace a few train-step dispatches into this directory.")
flags.DEFINE_boolean("input", True, "ImageNet (tf.data) recipes: also time this host's input "
                     "pipeline on the config's data.")
FLAGS = flags.FLAGS


def timed_windows(run_once: Callable[[], object], items_per_call: int, windows: int,
                  seconds: float) -> dict:
  """Median items/s over windows of repeated calls; `run_once` must block on its result."""
  t = time.perf_counter()
  run_once()
  calls = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))
  rates = []
  for _ in range(windows):
    t = time.perf_counter()
    for _ in range(calls):
      run_once()
    rates.append(calls * items_per_call / (time.perf_counter() - t))
  return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
          "calls_per_window": calls}


def summarize_trace(trace_dir: str, calls: int) -> dict:
  """Per-dispatch op time by op kind (HLO name without its number) from a Perfetto trace.

  On GPUs the ops are the kernels on the device's streams; on CPU, ops run on several threads
  at once, so their time may exceed the wall time.
  """
  path = max(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
             key=os.path.getmtime)
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
  ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  on_streams = [e for e in ops if names.get((e["pid"], e.get("tid")), "").startswith("Stream")]
  ops = on_streams or ops
  kinds = collections.defaultdict(lambda: [0.0, 0])
  for e in ops:
    kind = kinds[re.sub(r"\.\d+$", "", e["args"]["hlo_op"])]
    kind[0] += e["dur"] / 1000 / calls
    kind[1] += 1 / calls
  ranked = sorted(kinds.items(), key=lambda item: -item[1][0])
  return {"trace": path, "device_streams": bool(on_streams),
          "op_ms_per_call": sum(ms for ms, _ in kinds.values()),
          "ops_per_call": sum(n for _, n in kinds.values()),
          "top_ops": [[name, round(ms, 4), round(n, 1)] for name, (ms, n) in ranked[:12]]}


def _check_writable_place(flag: str, path: str, what: str) -> None:
  """Refuses `path` if it cannot be created: its nearest existing ancestor must be a writable
  directory (nothing is created here)."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"--{flag} {path}: {parent} is a file, so the {what} cannot be made there.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--{flag} {path}: {parent} is not writable.")


def check_output_paths() -> None:
  """Fails at once on a --json or --profile path that cannot be written, which otherwise would
  fail only after the whole benchmark has run; makes the --json file's directory. A leading `~`,
  quoted too, is the home folder."""
  for flag in ("json", "profile"):
    if FLAGS[flag].value:
      FLAGS[flag].value = os.path.expanduser(FLAGS[flag].value)
  if FLAGS.json:
    path = FLAGS.json
    if os.path.isdir(path):
      raise ValueError(f"--json {path} is a directory; name a file to append the JSON lines to.")
    if os.path.exists(path):
      if not os.access(path, os.W_OK):
        raise ValueError(f"--json {path} is not writable.")
    else:
      _check_writable_place("json", path, "JSON file")
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if FLAGS.profile:
    path = FLAGS.profile
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"--profile {path} is a file; name a directory for the trace.")
    if os.path.isdir(path):
      if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--profile {path} is not writable.")
    else:
      _check_writable_place("profile", path, "trace directory")


@dataclasses.dataclass
class Bench:
  """What every measurement shares: the recipe as benchmarked, the mesh, the synthetic data
  (host and device copies) and the initial train state and teacher."""
  config: ml_collections.ConfigDict
  streaming: bool        # an ImageNet (tf.data) recipe: one step per dispatch
  mesh: Mesh
  batch_size: int
  steps_per_dispatch: int
  num_examples: int
  num_classes: int
  images_np: np.ndarray
  labels_np: np.ndarray
  images: jax.Array
  labels: jax.Array
  optimizer: optax.GradientTransformation
  steps_per_epoch: int
  state: train.TrainState
  train_graphdef: nnx.GraphDef
  eval_graphdef: nnx.GraphDef
  teacher: evaluation.Network | None
  teacher_vars: Any
  results: list[dict] = dataclasses.field(default_factory=list)
  # Which code, when: a figure is read long after (reporting.run_environment's `git`).
  git: str | None = dataclasses.field(default_factory=reporting.source_commit)
  date: str = dataclasses.field(default_factory=lambda: datetime.datetime.now(
      datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

  @property
  def dtype(self) -> jnp.dtype:
    return train.compute_dtype(self.config)

  @property
  def image_size(self) -> int:
    return self.config.data.image_size

  def common_fields(self) -> dict:
    """The setting of every measurement, in each JSON line."""
    config, distilling = self.config, methods.uses_teacher(self.config)
    return {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
            "jax": jax.__version__, "git": self.git, "date": self.date,
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
            "method": config.method,
            "sort": bool(config.sort) and distilling, "student": config.student.name,
            "teacher": config.teacher.name if distilling else None,
            "dtype": config.dtype, "batch_size": self.batch_size, "image_size": self.image_size,
            "teacher_fold_batchnorm": bool(config.teacher.get("fold_batchnorm")) and distilling,
            "teacher_stream_groups": config.teacher_stream_groups,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}

  def report(self, kind: str, **fields) -> None:
    """Prints one measurement as a JSON line (and appends it to --json)."""
    record = {"measurement": kind, **self.common_fields(), **fields}
    self.results.append(record)
    line = reporting.json_line(record)
    print(line, flush=True)
    if FLAGS.json:
      with open(FLAGS.json, "a") as f:
        f.write(line + "\n")

  def compile_dispatch(self, config: ml_collections.ConfigDict, state: train.TrainState,
                       teacher: evaluation.Network | None) -> tuple[Callable[[], None], dict]:
    """The trainer's jitted dispatch for `config`, compiled, a call that runs it once, and the
    box holding its latest state."""
    train_step = train.make_train_step(config, student_graphdef=self.train_graphdef,
                                       optimizer=self.optimizer,
                                       steps_per_epoch=self.steps_per_epoch)
    t_vars = self.teacher_vars if teacher is not None else None
    if self.streaming:
      args = (t_vars, self.images, self.labels)
      compiled = train.build_train_batch(config, self.mesh, train_step=train_step,
                                         teacher=teacher).lower(state, *args).compile()
    else:
      perm = jax.random.permutation(jax.random.PRNGKey(0), self.num_examples)
      args = (t_vars, self.images, self.labels, perm, jnp.int32(0))
      compiled = train.build_train_chunk(config, self.mesh, train_step=train_step,
                                         teacher=teacher).lower(
          state, *args, num_steps=self.steps_per_dispatch,
          batch_size=self.batch_size).compile()
    box = {"state": state}

    def run_once():
      box["state"], metrics = compiled(box["state"], *args)
      jax.block_until_ready(metrics)

    return run_once, box


def setup() -> Bench:
  """The benchmarked recipe (config and flags, checked as the trainer checks them), its
  synthetic data and its initial states."""
  config = FLAGS.config
  config.unlock()
  streaming = config.data.pipeline == "tf_data"
  if streaming and FLAGS["steps-per-dispatch"].value:
    raise ValueError("ImageNet (tf.data) recipes run one step per dispatch, as the trainer does; "
                     "--steps-per-dispatch is for CIFAR recipes.")
  batch_size = FLAGS["batch-size"].value or config.batch_size
  n = FLAGS["num-examples"].value
  # Set before the check: config.teacher_stream_groups must divide the steps timed.
  config.steps_per_dispatch = FLAGS["steps-per-dispatch"].value or config.steps_per_dispatch
  full_steps = n // batch_size if isinstance(batch_size, int) and batch_size > 0 else 0
  asked = (train.default_steps_per_dispatch() if config.steps_per_dispatch is None
           else config.steps_per_dispatch)
  if not streaming and 0 < full_steps < asked:  # else the dispatch timed would repeat batches
    print(f"An epoch of --num-examples {n} at batch {batch_size} has {full_steps} full steps, "
          "the most the trainer puts in one dispatch: timing dispatches of that many.")
    config.steps_per_dispatch = full_steps
  train.check_config(config)
  check_output_paths()  # before minutes of timing, not after
  config.dtype = FLAGS.dtype or config.dtype
  k = 1 if streaming else config.steps_per_dispatch or train.default_steps_per_dispatch()
  train.warn_if_slow_on_cpu(k)
  num_classes = FLAGS["num-classes"].value or models.default_num_classes(config.student.name)
  size = config.data.image_size
  dtype = train.compute_dtype(config)
  mesh = distributed.make_mesh()
  train.check_divisible_by_devices(batch_size, mesh.size, "--batch-size")
  if n < batch_size:
    raise ValueError(f"--num-examples {n} is smaller than the batch size {batch_size}: raise it "
                     "to at least the batch size, or lower --batch-size.")
  if streaming and FLAGS.input:  # the data must be there before minutes of timing
    try:
      data_sources.split_info(split=config.data.train_split,
                              **data_sources.stream_source(config.data))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
      raise ValueError(f"{e} (--noinput times the device step alone, without data.)") from e

  # On-device (CIFAR) recipes gather their batches from a whole synthetic split on the device;
  # tf.data (ImageNet) recipes get one synthetic batch as tf.data delivers it: cropped uint8.
  rng = np.random.default_rng(0)
  images_np = rng.integers(0, 256, (batch_size if streaming else n, size, size, 3), np.uint8)
  labels_np = rng.integers(0, num_classes, (len(images_np),), dtype=np.int32)
  steps_per_epoch = (math.ceil(n / batch_size) if streaming
                     else sum(s for s, _, _ in train.epoch_plan(n, batch_size, mesh.size, k)))
  optimizer = train.make_optimizer(config, steps_per_epoch)
  state, train_graphdef, eval_graphdef = train.create_train_state(config, num_classes, optimizer)
  teacher = teacher_vars = None
  if methods.uses_teacher(config):
    teacher_model = models.create_model(config.teacher.name, num_classes, rngs=nnx.Rngs(1),
                                        dtype=dtype)
    if config.teacher.get("fold_batchnorm"):
      models.fold_batchnorm(teacher_model, (size, size, 3))
    teacher, teacher_vars = evaluation.freeze(teacher_model)
  state, teacher_vars = distributed.replicate((state, teacher_vars), mesh)
  images, labels = (jax.device_put((images_np, labels_np), NamedSharding(mesh, P("data")))
                    if streaming else distributed.replicate((images_np, labels_np), mesh))
  return Bench(config, streaming, mesh, batch_size, k, n, num_classes, images_np, labels_np,
               images, labels, optimizer, steps_per_epoch, state, train_graphdef,
               eval_graphdef, teacher, teacher_vars)


def time_train_step(bench: Bench) -> tuple[Callable[[], None], dict]:
  """The trainer's dispatch: compilation, first call, then steady state."""
  t = time.perf_counter()
  run_once, box = bench.compile_dispatch(bench.config, bench.state, bench.teacher)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  run_once()
  warmup_s = time.perf_counter() - t
  k = bench.steps_per_dispatch
  stats = timed_windows(run_once, k * bench.batch_size, FLAGS.windows,
                        FLAGS["window-seconds"].value)
  bench.report("train_step", steps_per_dispatch=k, compile_s=compile_s, first_call_s=warmup_s,
               **stats)
  return run_once, box


def profile_train_step(bench: Bench, run_once: Callable[[], None]) -> None:
  """A trace of a few dispatches into --profile, and where their device time goes."""
  calls, k = 3, bench.steps_per_dispatch
  with jax.profiler.trace(FLAGS.profile, create_perfetto_trace=True):
    t = time.perf_counter()
    for _ in range(calls):
      run_once()
    wall_ms = (time.perf_counter() - t) * 1000 / calls
  summary = summarize_trace(FLAGS.profile, calls)
  bench.report("profile_train_step", steps_per_dispatch=k, wall_ms_per_call=wall_ms,
               images_per_s=k * bench.batch_size / wall_ms * 1000, **summary)
  print(f"\nper dispatch of {k} steps: {wall_ms:.2f} ms wall, "
        f"{summary['op_ms_per_call']:.2f} ms in {summary['ops_per_call']:.0f} XLA ops")
  for name, ms, count in summary["top_ops"]:
    print(f"  {name:<40}{ms:>10.3f} ms {count:>8.0f} ops")


def time_eval(bench: Bench, student_state: train.TrainState) -> None:
  """The trainer's test evaluation of the student: the whole-split evaluator (CIFAR, up to
  10,000 images in whole batches) or the per-batch one (tf.data), over two device batches of its
  own."""
  config, mesh, size = bench.config, bench.mesh, bench.image_size
  if bench.streaming:
    rng = np.random.default_rng(1)
    b = evaluation.eval_batch_size(config.eval_batch_size, mesh.size)
    n_eval = 2 * b
    eval_batches = [jax.device_put(
        {"image": rng.integers(0, 256, (b, size, size, 3), np.uint8),
         "label": rng.integers(0, bench.num_classes, (b,), dtype=np.int32),
         "mask": np.ones((b,), bool)}, NamedSharding(mesh, P("data"))) for _ in range(2)]
    evaluate = evaluation.make_streaming_evaluator(mesh, lambda: iter(eval_batches),
                                                   dtype=bench.dtype)
  else:
    # Whole batches: the evaluator pads the last one, and its padding is computed but would not
    # be counted (the trainer's 10,000 test images at its batch of 1,000 have none).
    available = min(bench.num_examples, 10_000)
    b = evaluation.eval_batch_size(config.eval_batch_size, mesh.size, available)
    n_eval = available // b * b or available  # fewer than b: one batch, padded to the devices
    evaluate = evaluation.make_evaluator(mesh, bench.images_np[:n_eval],
                                         bench.labels_np[:n_eval], config.eval_batch_size,
                                         dtype=bench.dtype)
  student_vars = (student_state.params["student"], student_state.batch_stats)
  network = evaluation.Network(bench.eval_graphdef)
  t = time.perf_counter()
  evaluate(network, student_vars)
  first = time.perf_counter() - t
  stats = timed_windows(lambda: evaluate(network, student_vars), n_eval, FLAGS.windows,
                        FLAGS["window-seconds"].value)
  bench.report("eval_student", eval_batch_size=evaluation.eval_batch_size(
      config.eval_batch_size, mesh.size, None if bench.streaming else n_eval),
               eval_images=n_eval, first_call_s=first, **stats)


def step_parts(bench: Bench) -> dict[str, tuple[Callable, tuple, int]]:
  """The parts of the step that `--breakdown` times alone, as (jitted function, arguments,
  images per call), each at the size the trainer runs it: augmentation per step; the teacher
  and its targets (Sort) once per dispatch. Their batches are split over the devices as the
  trainer's are (the CIFAR split itself is on every device); inputs are arguments, so XLA cannot
  fold them away."""
  config, k, batch_size = bench.config, bench.steps_per_dispatch, bench.batch_size
  teacher, teacher_vars = bench.teacher, bench.teacher_vars
  split = lambda a, count: jax.device_put(a[:count], NamedSharding(bench.mesh, P("data")))
  m = batch_size if bench.streaming else k * batch_size
  x = augment.normalize(split(bench.images, m), *augment.PIPELINE_STATS[config.data.pipeline],
                        bench.dtype)
  parts = {}
  if not bench.streaming:  # tf.data crops and flips on the host
    parts["augment"] = (jax.jit(lambda imgs: augment.cifar_train_augment(
        jax.random.PRNGKey(0), imgs, dtype=bench.dtype)), (split(bench.images, batch_size),),
        batch_size)
  if teacher is not None:
    parts["teacher_forward"] = (jax.jit(teacher), (teacher_vars, x), m)
    parts["teacher_targets"] = (jax.jit(functools.partial(methods.teacher_targets, config)),
                                (teacher(teacher_vars, x), split(bench.labels, m)), m)
  return parts


def time_parts(bench: Bench) -> None:
  """`step_parts` and the step without a teacher, each timed alone (windows of half
  --window-seconds)."""
  config, k, batch_size, teacher = (bench.config, bench.steps_per_dispatch, bench.batch_size,
                                    bench.teacher)
  parts = step_parts(bench)
  for name, (fn, args, count) in parts.items():
    fn(*args).block_until_ready()
    stats = timed_windows(lambda: fn(*args).block_until_ready(), count, FLAGS.windows,
                          FLAGS["window-seconds"].value / 2)
    bench.report(f"part_{name}", batch=count, **stats)
  if teacher is None:
    if not parts:
      print("--breakdown: nothing to time apart (tf.data augments on the host, and the recipe "
            "has no teacher).")
    return
  vanilla = config.copy_and_resolve_references()  # the student's share of the step
  vanilla.method = "vanilla"
  v_state = distributed.replicate(
      train.create_train_state(vanilla, bench.num_classes, bench.optimizer)[0], bench.mesh)
  run_vanilla, _ = bench.compile_dispatch(vanilla, v_state, None)
  run_vanilla()
  stats = timed_windows(run_vanilla, k * batch_size, FLAGS.windows,
                        FLAGS["window-seconds"].value / 2)
  bench.report("part_student_step_without_teacher", steps_per_dispatch=k, **stats)


def time_input_pipeline(bench: Bench) -> None:
  """This host's tf.data stream of an ImageNet recipe: decode, crop, flip, batch."""
  d = bench.config.data
  batches = imagenet_input.imagenet_train_dataset(
      global_batch_size=bench.batch_size, split=d.train_split, shuffle_buffer=d.shuffle_buffer,
      image_size=d.image_size, **data_sources.stream_source(d)).as_numpy_iterator()
  t = time.perf_counter()
  local_batch = len(next(batches)["image"])  # the global batch's share of this process
  first = time.perf_counter() - t
  stats = timed_windows(lambda: next(batches), local_batch, FLAGS.windows,
                        FLAGS["window-seconds"].value)
  bench.report("input_pipeline", host_cpus=os.cpu_count(), first_call_s=first, **stats)


def print_table(bench: Bench) -> None:
  """The measurements as a readable table, after their JSON lines."""
  print(f"\n{'measurement':<36}{'images/s':>14}  details")
  for r in bench.results:
    detail = ", ".join(f"{key}={r[key]:.1f}" if isinstance(r[key], float) else f"{key}={r[key]}"
                       for key in ("steps_per_dispatch", "compile_s", "eval_batch_size",
                                   "host_cpus")
                       if key in r)
    print(f"{r['measurement']:<36}{r['images_per_s']:>14,.0f}  {detail}")
  common = bench.common_fields()
  pair = (f"{common['teacher']} -> {common['student']}" if common["teacher"]
          else common["student"])
  print(f"device: {common['device']} x{common['num_devices']}, jax {common['jax']}, "
        f"{common['method']}{'+Sort' if common['sort'] else ''} {pair}, batch "
        f"{bench.batch_size}, {bench.image_size} px, {common['dtype']}"
        + (f", teacher in {common['teacher_stream_groups']} stream groups"
           if common["teacher"] and common["teacher_stream_groups"] > 1 else ""))


def main():
  bench = setup()
  run_once, box = time_train_step(bench)
  if FLAGS.profile:
    profile_train_step(bench, run_once)
  if FLAGS.eval:
    time_eval(bench, box["state"])
  if FLAGS.breakdown:
    time_parts(bench)
  if bench.streaming and FLAGS.input:
    time_input_pipeline(bench)
  print_table(bench)


if __name__ == "__main__":
  cli.run(main)
