"""sortkd_jax: logit knowledge distillation with the Sort teacher-logit correction, in JAX."""

from sortkd_jax import losses
from sortkd_jax.sort import sort_teacher_logits

__all__ = ["losses", "sort_teacher_logits"]
