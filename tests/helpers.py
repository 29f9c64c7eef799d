"""Helpers shared by the test modules: `from helpers import REPO, read_metrics, run_script`.

tests/ is on sys.path through pyproject.toml's `[tool.pytest.ini_options] pythonpath`.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*args, cwd=REPO, env=None, timeout=300) -> subprocess.CompletedProcess:
  """`python ARGS` on CPU (JAX_PLATFORMS=cpu, plus `env`) from `cwd`, capturing text output."""
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                        cwd=cwd, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def run_script(script, *args, cwd=REPO, env=None, timeout=300) -> subprocess.CompletedProcess:
  """scripts/SCRIPT ARGS, as `run_python` runs it (from the repository root by default)."""
  return run_python(os.path.join(REPO, "scripts", script), *args, cwd=cwd, env=env,
                    timeout=timeout)


def read_metrics(workdir) -> list[dict]:
  """The records of a training run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
