"""Joining a multi-process run (the runs themselves: test_parallel.py)."""

import jax
import pytest

from sortkd_jax import distributed


def test_incomplete_multi_process_flags_are_refused():
  with pytest.raises(ValueError, match="needs all of --coordinator_address"):
    distributed.maybe_initialize(None, 2, 0)
  with pytest.raises(ValueError, match=r"--process_id must be in \[0, 2\)"):
    distributed.maybe_initialize("localhost:12355", 2, 2)
  with pytest.raises(ValueError, match="must be HOST:PORT"):
    distributed.maybe_initialize("localhost", 2, 0)


@pytest.mark.parametrize("environment,joins", [
    ({}, False),
    ({"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, True),  # srun
    ({"SLURM_NTASKS": "2"}, False),  # python inside salloc: no peers were started
    ({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),  # mpirun
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
])
def test_slurm_and_open_mpi_launches_are_detected(monkeypatch, environment, joins):
  for name in ("SLURM_NTASKS", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
  distributed.maybe_initialize()
  assert calls == ([()] if joins else [])
  distributed.maybe_initialize("host0:1234", 4, 3)  # flags win, whatever the launcher
  assert calls[-1] == ("host0:1234", 4, 3)
