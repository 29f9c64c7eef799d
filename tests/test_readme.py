"""The README's code for users' own training loops runs as written, and does what it says."""

import os
import re

import jax
import numpy as np
from flax import nnx

from helpers import REPO
from sortkd_jax import losses, sort_teacher_logits

SECTION = "## Sort and the losses in your own training loop"


def _readme_block(section: str) -> str:
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  after = text[text.index(section):]
  return re.search(r"```python\n(.*?)```", after, re.S)[1]


def test_own_training_loop_snippet():
  code = _readme_block(SECTION)
  assert "sort_teacher_logits" in code and "losses.kd" in code
  # Run it up to its step, then check that step against the same loss computed by hand.
  before, step_line = code.rsplit("\n", 2)[0], code.rsplit("\n", 2)[1]
  assert step_line.startswith("loss = train_step(")
  namespace = {}
  exec(compile(before, "README.md", "exec"), namespace)
  student, teacher = namespace["student"], namespace["teacher"]
  images, labels = namespace["images"], namespace["labels"]
  fresh = nnx.clone(student)

  def stats(model):
    return jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  student_stats, teacher_stats = stats(student), stats(teacher)
  logits = fresh(images)
  targets = sort_teacher_logits(nnx.clone(teacher)(images), labels)
  expected = 0.1 * losses.cross_entropy(logits, labels) + 0.9 * losses.kd(logits, targets, 4.0)

  exec(compile(step_line, "README.md", "exec"), namespace)
  np.testing.assert_allclose(namespace["loss"], expected, rtol=1e-5)
  # The student learned and its BatchNorm statistics moved; the frozen teacher's did not.
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         nnx.state(student, nnx.Param), nnx.state(fresh, nnx.Param))
  assert all(jax.tree.leaves(changed))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), stats(student), student_stats)
  assert all(jax.tree.leaves(moved))
  jax.tree.map(np.testing.assert_array_equal, stats(teacher), teacher_stats)
