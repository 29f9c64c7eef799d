"""sortkd_jax: logit knowledge distillation with the Sort teacher-logit correction, in JAX."""

import importlib.metadata
import os
import sys
import warnings

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _turn_off_ynn_fusions_of_jaxlib_0_10() -> None:
  """Turns off XLA:CPU's YNNPACK fusions under jaxlib 0.10, before JAX starts a backend.

  With them, jaxlib 0.10.2 computed some training-step gradients wrongly on two CPU threads and
  right on one: a ResNet block's convolution weight gradient 11% off, deterministically (a
  2-core AVX-512 Xeon, 2026-12-02; tests/test_reference_step.py failed there). Without them
  the step matches float64 PyTorch, and it ran faster on that machine (README: Speed). XLA
  reads XLA_FLAGS once, when JAX starts its first backend, and aborts on a flag it does not
  know: the flag is added only for jaxlib 0.10.x (0.10.0 and 0.10.2 have it), and never over a
  value already given; jaxlib 0.11.2 and 0.12.0, whose fusions gave the same gradients on one
  thread and two on that Xeon, are left alone (README: Install). It sets an XLA:CPU option
  only; GPU programs compile as before. A CPU backend already started, by JAX code run before
  this import, keeps them: that gets a warning.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG in flags:
    return
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  if version.split(".")[:2] != ["0", "10"]:
    return
  os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=".strip()
  if _cpu_backend_already_started():
    warnings.warn(
        "JAX ran on the CPU before sortkd_jax was imported, so XLA:CPU keeps its YNNPACK "
        "fusions, with which jaxlib 0.10 computed some training-step gradients wrongly on "
        "several CPU threads. Import sortkd_jax before running any JAX code, or start Python "
        f"with XLA_FLAGS='{_YNN_FLAG}='.", RuntimeWarning)


def _cpu_backend_already_started() -> bool:
  """Whether JAX has started its backends, CPU the default (by a private function of jax 0.10,
  asked only under that version)."""
  if "jax" not in sys.modules:
    return False
  import jax  # already imported: this starts nothing
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized() and jax.default_backend() == "cpu"


_turn_off_ynn_fusions_of_jaxlib_0_10()

from sortkd_jax import losses  # noqa: E402  (after the flag: importing it may start JAX)
from sortkd_jax.sort import sort_teacher_logits  # noqa: E402

__all__ = ["losses", "sort_teacher_logits"]
