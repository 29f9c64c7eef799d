"""Joining a multi-process run, and host-side sums (the runs themselves: test_parallel.py)."""

import errno
import socket

import jax
import numpy as np
import pytest

from sortkd_jax import distributed


def test_incomplete_multi_process_flags_are_refused():
  with pytest.raises(ValueError, match="needs all of --coordinator_address, --num_processes "
                     "and --process_id; --coordinator_address is missing"):
    distributed.maybe_initialize(None, 2, 0)
  with pytest.raises(ValueError, match="; --coordinator_address and --process_id are missing"):
    distributed.maybe_initialize(None, 2, None)
  with pytest.raises(ValueError, match=r"--process_id must be in \[0, 2\)"):
    distributed.maybe_initialize("localhost:12355", 2, 2)
  with pytest.raises(ValueError, match="must be HOST:PORT"):
    distributed.maybe_initialize("localhost", 2, 0)


def test_a_process_count_other_than_process_0s_is_refused(monkeypatch, joins):
  """The coordinator's --num_processes is the run's: a process told otherwise joins, then
  stops with what to fix (its run would train, with its flag wrong)."""
  distributed.maybe_initialize("127.0.0.1:1234", 2, 1)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: None)  # joins 2
  with pytest.raises(ValueError, match=r"--num_processes=3, but process 0 at 127.0.0.1:1234 "
                     r"runs 2 processes: give every process the same"):
    distributed.maybe_initialize("127.0.0.1:1234", 3, 1)


def test_process_0_refuses_a_coordinator_port_in_use(joins):
  """JAX's coordinator service crashed with a segmentation fault on a port in use (a second
  process 0, or another program): refused first, with what to change."""
  with socket.socket() as other_program:
    other_program.bind(("", 0))
    other_program.listen()
    port = other_program.getsockname()[1]
    with pytest.raises(ValueError, match=f"Process 0 cannot serve the coordinator on port {port} "
                       r"of this host: Address already in use \(another program, or another "
                       r"process 0, holds it\)"):
      distributed.maybe_initialize(f"localhost:{port}", 2, 0)
    assert not joins
    distributed.maybe_initialize(f"localhost:{port}", 2, 1)  # the coordinator is elsewhere
  distributed.maybe_initialize(f"localhost:{port}", 2, 0)  # free again
  assert [args for args, _ in joins] == [(f"localhost:{port}", 2, 1), (f"localhost:{port}", 2, 0)]


def test_the_port_probe_works_without_ipv6_and_names_a_privileged_port(monkeypatch, joins):
  """A kernel without IPv6 refuses AF_INET6 sockets (JAX's service then binds IPv4); a port below
  1024 needs root."""
  bound = []

  class Socket:
    def __init__(self, family, kind):
      if family == socket.AF_INET6:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
      self.family = family

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def setsockopt(self, *args):
      pass

    def bind(self, address):
      bound.append((self.family, address))
      if address[1] < 1024:
        raise OSError(errno.EACCES, "Permission denied")

  monkeypatch.setattr(socket, "socket", Socket)
  distributed.maybe_initialize("localhost:12355", 2, 0)
  assert bound == [(socket.AF_INET, ("", 12355))] and len(joins) == 1
  with pytest.raises(ValueError, match=r"port 999 of this host: Permission denied \(a port below "
                     r"1024 needs root\)"):
    distributed.maybe_initialize("localhost:999", 2, 0)


def test_the_port_probe_leaves_a_bind_address_of_jax_alone(monkeypatch, joins):
  """JAX_COORDINATOR_BIND_ADDRESS tells JAX where to serve, which may be another interface or
  port than the one probed; ports outside 1-65535 are refused with the address's format."""
  with socket.socket() as other_program:
    other_program.bind(("", 0))
    other_program.listen()
    port = other_program.getsockname()[1]
    monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", f"127.0.0.2:{port + 1}")
    distributed.maybe_initialize(f"localhost:{port}", 2, 0)
  assert len(joins) == 1
  for bad in ("localhost:70000", "localhost:0"):
    with pytest.raises(ValueError, match="must be HOST:PORT"):
      distributed.maybe_initialize(bad, 2, 0)


LAUNCHER_VARIABLES = ("SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_GPUS_ON_NODE", "SLURM_NODEID",
                      "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                      "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri")


@pytest.fixture
def joins(monkeypatch):
  """Records the `jax.distributed.initialize` calls (args, kwargs); restores the preemption
  service setting that joining turns off."""
  for name in LAUNCHER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  calls = []

  def initialize(*args, **kwargs):
    calls.append((args, kwargs))
    if args:  # explicit flags, all agreeing: the run has the processes asked for
      monkeypatch.setattr(jax, "process_count", lambda: args[1])

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  preemption = jax.config.jax_enable_preemption_service
  yield calls
  jax.config.update("jax_enable_preemption_service", preemption)


@pytest.mark.parametrize("environment,joined", [
    ({}, False),
    ({"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, True),  # srun
    ({"SLURM_NTASKS": "2"}, False),  # python inside salloc: no peers were started
    ({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
])
def test_slurm_and_open_mpi_launches_are_detected(monkeypatch, joins, environment, joined):
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  distributed.maybe_initialize()
  assert joins == ([((), {})] if joined else [])
  # Flags win, whatever the launcher, and no cluster detection pins the process to one GPU.
  distributed.maybe_initialize("host0:1234", 4, 3)
  assert joins[-1] == (("host0:1234", 4, 3), {"cluster_detection_method": "deactivate"})
  # JAX's preemption service would swallow SIGTERM (test_parallel.py sends one).
  assert not jax.config.jax_enable_preemption_service


def test_an_open_mpi_launch_jax_cannot_join_says_what_to_pass(monkeypatch, joins):
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # Open MPI 5: no OMPI_MCA_orte_hnp_uri
  with pytest.raises(ValueError, match=r"one process per host \(mpirun --npernode 1\) with "
                     r"--coordinator_address=HOST0:PORT --num_processes=N --process_id=I"):
    distributed.maybe_initialize()
  assert joins == []


@pytest.mark.parametrize("variables,warns", [
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "1"}, True),  # no --ntasks-per-node
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"}, False),
    ({"SLURM_TASKS_PER_NODE": "8,1", "SLURM_NODEID": "1"}, True),
    ({"SLURM_TASKS_PER_NODE": "8,1", "SLURM_NODEID": "0"}, False),
    ({"SLURM_TASKS_PER_NODE": "1", "SLURM_NODEID": "1"}, False),  # a list too short: no guess
    ({}, False),
])
def test_slurm_gpus_left_idle_are_warned_of(monkeypatch, joins, caplog, variables, warns):
  """JAX gives each SLURM task one GPU: one task on an 8-GPU node would train on 1 of them."""
  environment = {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_GPUS_ON_NODE": "8",
                 **variables}
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  with caplog.at_level("WARNING"):
    distributed.maybe_initialize()
  assert joins == [((), {})]
  assert ("stay idle" in caplog.text) == warns
  if warns:
    assert "7 stay idle. Launch one task per GPU (srun --ntasks-per-node=8)" in caplog.text


def test_metric_sums_add_up_in_float64_on_the_host():
  """Each dispatch's float32 sums are added on the host in float64: over an epoch float32 would
  lose the low digits (2**24 + 1 is not a float32)."""
  sums = distributed.replicate([{"x": np.float32(2**24)}, {"x": np.float32(1)}],
                               distributed.make_mesh())
  assert distributed.sum_on_host(sums) == {"x": 2**24 + 1}
