"""Session set-up shared by every test module."""

import gc
import importlib.util
import os
import signal
import sys
import tempfile

import pytest

# PyTorch's CUDA builds bring triton, which torch.optim imports on its first use; loaded after
# TensorFlow, triton's library crashed the test process (SIGSEGV; triton 3.7.1, tensorflow
# 2.21.0), while loaded first it lives beside it. The CPU builds have no triton.
if importlib.util.find_spec("triton") is not None:
  importlib.import_module("triton")


@pytest.fixture(autouse=True, scope="session")
def temporary_files_under_pytest(tmp_path_factory):
  """Points temporary files, this process's and its subprocesses', into pytest's base temp,
  which pytest prunes: tfds 4.9.10 leaves an empty `tmp*tfds` folder behind each time it makes
  the builder of a dataset that is not prepared (`DatasetInfo.initialize_from_bucket`); the
  library removes those it sees made, and the suite's tests make files of their own there."""
  where = str(tmp_path_factory.mktemp("tempfiles"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tempfile, "tempdir", where)
    patch.setenv("TMPDIR", where)
    yield


@pytest.fixture(autouse=True, scope="session")
def compilation_cache_shared_by_the_run(tmp_path_factory):
  """One JAX persistent compilation cache for the run's test processes and their subprocesses:
  the tests compile the same tiny programs again and again (each script in a subprocess compiles
  its steps anew), and XLA's compile time is most of their time on a CPU. Only the machine code
  is reused; tracing, lowering and every run's work are the tests' own."""
  import jax

  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  where = str(root / "jax-compilation-cache")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAX_COMPILATION_CACHE_DIR", where)
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield


@pytest.fixture
def python_sigint_handler():
  """Python's own SIGINT handler (a KeyboardInterrupt) for a test that sends itself Ctrl-C. A
  process started with SIGINT ignored (`pytest ... &` in a script, as under nohup) inherits
  that, Python leaves it so, and such a test's Ctrl-C was ignored: it failed."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
  """A test process frees JAX's caches of the run's compiled programs and collects its garbage
  before xdist hears that it is done, leaving the rest of its end to take a moment. Otherwise
  pytest's ten closing garbage collections (over 5 s on 2 cores) outlasted execnet's 5 s of
  grace after the run, whose SIGINT then showed as a KeyboardInterrupt ignored in hypothesis'
  gc callback, and JAX's exit, freeing those caches, outlasted xdist's 10 s before it kills."""
  if "jax" in sys.modules:
    sys.modules["jax"].clear_caches()
  gc.collect()
  gc.freeze()  # what is left lives to the end: pytest's closing collections need not walk it
