"""Session set-up shared by every test module."""

import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def temporary_files_under_pytest(tmp_path_factory):
  """Points temporary files, this process's and its subprocesses', into pytest's base temp,
  which pytest prunes: tfds 4.9.10 leaves an empty `tmp*tfds` folder behind each time it makes
  the builder of a dataset that is not prepared (`DatasetInfo.initialize_from_bucket`), hundreds
  per run of the suite."""
  where = str(tmp_path_factory.mktemp("tempfiles"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tempfile, "tempdir", where)
    patch.setenv("TMPDIR", where)
    yield
