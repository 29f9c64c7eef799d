"""Test-set evaluation: loss, top-1 and top-5 of a network over a whole split.

As mdistiller's validate (spec §7.4): per-example means over every test example, none dropped
(batches are padded and masked). A CIFAR-sized split is held on the device and evaluated in one
dispatch; an ImageNet split streams through tf.data, resized and centre-cropped. Training
(`train`) and scripts/eval.py share `make_test_evaluator`. A network runs here as `Network`, an
eval-mode graphdef called with its variables, as the frozen teacher runs in training too.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sortkd_jax import augment
from sortkd_jax import data_sources  # imports TensorFlow only when data is first read
from sortkd_jax import distributed
from sortkd_jax import imagenet_input
from sortkd_jax import input_pipeline
from sortkd_jax import losses

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Network:
  """A network's graphdef, called with its variables: hashable, so it can be a static argument."""
  graphdef: nnx.GraphDef

  def __call__(self, variables: tuple[PyTree, ...], images: jax.Array) -> jax.Array:
    return nnx.merge(self.graphdef, *variables)(images)


def freeze(model: nnx.Module) -> tuple[Network, tuple[PyTree, PyTree]]:
  """An eval-mode network and its pure variables (the teacher never leaves eval mode)."""
  model.eval()
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return Network(graphdef), (nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats))


def pad_for_eval(images: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple[np.ndarray, ...]:
  """Pads to whole batches and masks the padding, so no test example is ever dropped."""
  n = len(labels)
  num_batches = max(1, math.ceil(n / batch_size))
  pad = num_batches * batch_size - n
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  shape = (num_batches, batch_size)
  return (images.reshape(shape + images.shape[1:]), labels.reshape(shape), mask.reshape(shape))


def eval_batch_size(requested: int, num_devices: int, num_examples: int | None = None) -> int:
  """Evaluation pads and masks its batches, so any size works: round up to the devices. At most
  the split's `num_examples` (rounded up too), so a small split is not padded to a big batch."""
  if num_examples is not None:
    requested = min(requested, num_examples)
  return -(-requested // num_devices) * num_devices


def _eval_batch_sums(model: Network, variables, images, labels, mask, *, batch_sharding,
                     stats, compute_dtype):
  """Summed CE, top-1 and top-5 hits of one masked batch of uint8 images, normalised with
  `stats` (mean, std)."""
  x = jax.lax.with_sharding_constraint(augment.normalize(images, *stats, compute_dtype),
                                       batch_sharding)
  mask = mask.astype(jnp.float32)
  logits = model(variables, x).astype(jnp.float32)
  ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
  hits = lambda k: losses.topk_correct(logits, labels, k).astype(jnp.float32)
  return {"loss": (ce * mask).sum(), "top1": (hits(1) * mask).sum(),
          "top5": (hits(5) * mask).sum(), "count": mask.sum()}


def _eval_sums(model: Network, variables, images, labels, mask, **kwargs):
  """`_eval_batch_sums` summed over [num_batches, batch, ...] padded data, in one dispatch."""

  def body(totals, batch):
    return jax.tree.map(jnp.add, totals, _eval_batch_sums(model, variables, *batch, **kwargs)), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "top1", "top5", "count")}
  totals, _ = jax.lax.scan(body, zeros, (images, labels, mask))
  return totals


def _eval_summary(sums: dict[str, np.ndarray]) -> dict[str, float]:
  """Averages in float64, like the streamed path's host sums: 945 of 10,000 right is a top-1
  of 9.45, not float32's 9.449999809265137 (the device's sums are exact counts)."""
  sums = {k: float(v) for k, v in sums.items()}
  count = sums["count"]
  return {"test_loss": sums["loss"] / count, "test_top1": 100 * sums["top1"] / count,
          "test_top5": 100 * sums["top5"] / count, "test_examples": int(count)}


def make_evaluator(mesh: Mesh, images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                   dtype: jnp.dtype = jnp.float32) -> Callable[[Network, PyTree], dict[str, float]]:
  """A function computing test loss, top-1 and top-5 (%) of a network on a whole split, and
  the number of examples counted.

  The split (CIFAR-sized, normalised with CIFAR's statistics) is padded to whole batches with a
  mask and held on the device; one dispatch per evaluation.
  """
  batch_size = eval_batch_size(batch_size, mesh.size, len(labels))
  data = distributed.replicate(pad_for_eval(images, labels.astype(np.int32), batch_size), mesh)
  sums_fn = jax.jit(functools.partial(
      _eval_sums, batch_sharding=NamedSharding(mesh, P("data")),
      stats=augment.PIPELINE_STATS["on_device"], compute_dtype=dtype),
      static_argnums=(0,), out_shardings=NamedSharding(mesh, P()))

  def evaluate(network: Network, variables: PyTree) -> dict[str, float]:
    return _eval_summary(distributed.to_host(sums_fn(network, variables, *data)))

  return evaluate


def make_streaming_evaluator(mesh: Mesh, batches: Callable[[], Iterator[dict[str, jax.Array]]],
                             *, dtype: jnp.dtype = jnp.float32
                             ) -> Callable[[Network, PyTree], dict[str, float]]:
  """Like `make_evaluator`, over a fresh pass of masked device batches (ImageNet statistics)."""
  sums_fn = jax.jit(functools.partial(
      _eval_batch_sums, batch_sharding=NamedSharding(mesh, P("data")),
      stats=augment.PIPELINE_STATS["tf_data"], compute_dtype=dtype),
      static_argnums=(0,), out_shardings=NamedSharding(mesh, P()))

  def evaluate(network: Network, variables: PyTree) -> dict[str, float]:
    return _eval_summary(distributed.sum_on_host(
        [sums_fn(network, variables, b["image"], b["label"], b["mask"]) for b in batches()]))

  return evaluate


def make_test_evaluator(config: ml_collections.ConfigDict, mesh: Mesh, *, dtype: jnp.dtype,
                        test_split: input_pipeline.ArraySplit | None = None
                        ) -> tuple[Callable[[Network, PyTree], dict[str, float]], int]:
  """The test evaluator of `config.data`'s pipeline, and the split's class count.

  A CIFAR-sized split (`test_split` if already loaded) is held on the device; a `tf_data` split
  (ImageNet) is streamed, resized and centre-cropped. `config` is one `train.check_config` passed.
  """
  d = config.data
  if d.pipeline == "on_device":
    if test_split is None:
      (test_split,) = input_pipeline.load_splits(d, include_train=False)
    evaluate = make_evaluator(mesh, test_split.images, test_split.labels, config.eval_batch_size,
                              dtype=dtype)
    return evaluate, test_split.num_classes
  source = data_sources.stream_source(d)
  n, num_classes = data_sources.split_info(split=d.test_split, **source)
  if d.max_test_examples is not None:
    n = min(n, d.max_test_examples)
  batch = eval_batch_size(config.eval_batch_size, mesh.size, n)
  batch_sharding = NamedSharding(mesh, P("data"))

  stream, per_pass = None, None

  def batches():
    """One pass; one tf.data iterator for every pass (as training's `epochs_from`)."""
    nonlocal stream, per_pass
    if stream is None:
      ds = imagenet_input.imagenet_eval_dataset(
          global_batch_size=batch, split=d.test_split, image_size=d.image_size,
          resize_size=round(d.image_size * 256 / 224), max_examples=d.max_test_examples,
          **source)
      per_pass = int(ds.cardinality())
      numpy_batches = imagenet_input.naming_undecodable(
          ds.repeat().as_numpy_iterator(), split=d.test_split, max_examples=d.max_test_examples,
          **source)
      stream = distributed.prefetch_to_device(numpy_batches, 2, batch_sharding)
    return itertools.islice(stream, per_pass)

  evaluate = make_streaming_evaluator(mesh, batches, dtype=dtype)
  return evaluate, num_classes
