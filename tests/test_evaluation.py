"""The test evaluation (mdistiller's validate, spec §7.4): every example counted once, padding
masked out, on the device-held and the streamed path alike."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sortkd_jax import augment, distributed, evaluation, models


def _ranked_labels(logits):
  """Labels at ranks 1, 1, 3, 5, 6, 10, 10 of 7 images' logits (top-1 2/7, top-5 4/7: ranks 5
  and 6 tell top-5 from top-4 and top-6), and the expected loss, top-1 and top-5 (%)."""
  ranked = np.argsort(-logits, axis=-1)
  labels = ranked[np.arange(7), [0, 0, 2, 4, 5, 9, 9]].astype(np.int32)
  expected = (float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()),
              100 * float(np.mean(ranked[:, 0] == labels)),
              100 * float(np.mean((ranked[:, :5] == labels[:, None]).any(-1))))
  assert expected[1:] == (pytest.approx(200 / 7), pytest.approx(400 / 7))
  return labels, expected


def test_evaluation_counts_every_example_once_whatever_the_batch():
  """Padding is masked: a 7-image split gives the same loss and accuracy at batch 2, 7 and 1000
  (which is capped at the split's size), equal to a direct computation."""
  model = models.create_model("resnet8", 10, rngs=nnx.Rngs(0))
  network, variables = evaluation.freeze(model)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 32, 32, 3), np.uint8)
  logits = np.asarray(model(augment.normalize(images, augment.CIFAR_MEAN, augment.CIFAR_STD)))
  labels, (expected_loss, expected_top1, expected_top5) = _ranked_labels(logits)
  mesh = distributed.make_mesh()
  for batch_size in (2, 7, 1000):
    result = evaluation.make_evaluator(mesh, images, labels, batch_size)(network, variables)
    assert result["test_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["test_top1"] == pytest.approx(expected_top1)
    assert result["test_top5"] == pytest.approx(expected_top5)
    assert result["test_examples"] == 7
    # As the user's calculator has them, not float32's 28.571428298950195.
    assert (result["test_top1"], result["test_top5"]) == (100 * 2 / 7, 100 * 4 / 7)
  with jax.numpy_dtype_promotion("strict"):  # a bool's hits times a float mask failed there
    strict = evaluation.make_evaluator(mesh, images, labels, 7)(network, variables)
  assert strict["test_top5"] == pytest.approx(expected_top5)
  assert evaluation.eval_batch_size(1000, 4, num_examples=6) == 8
  assert evaluation.eval_batch_size(1000, 4) == 1000
  assert evaluation.eval_batch_size(10, 4, 100) == 12


def test_streamed_evaluation_leaves_out_the_masked_padding():
  """The ImageNet path: batches as the tf.data eval stream delivers them, the last one padded
  with images (here of other content) whose mask is off; normalised with ImageNet's statistics."""
  model = models.create_model("resnet8", 10, rngs=nnx.Rngs(0))
  network, variables = evaluation.freeze(model)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (7, 32, 32, 3), np.uint8)
  logits = np.asarray(model(augment.normalize(images, *augment.PIPELINE_STATS["tf_data"])))
  labels, (expected_loss, expected_top1, expected_top5) = _ranked_labels(logits)
  padding = rng.integers(0, 256, (1, 32, 32, 3), np.uint8)
  mesh = distributed.make_mesh()
  batches = [{"image": np.concatenate([images[4:], padding]), "label": np.append(labels[4:], 0),
              "mask": np.array([True, True, True, False])},
             {"image": images[:4], "label": labels[:4], "mask": np.ones(4, bool)}]
  on_device = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
  result = evaluation.make_streaming_evaluator(mesh, lambda: iter(on_device))(network, variables)
  assert result["test_loss"] == pytest.approx(expected_loss, rel=1e-5)
  assert result["test_top1"] == pytest.approx(expected_top1)
  assert result["test_top5"] == pytest.approx(expected_top5)
  assert result["test_examples"] == 7
