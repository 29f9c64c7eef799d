"""Processes and devices: joining a multi-process run, the device mesh, replicated values.

Data parallelism is `jax.jit` over a 1-D mesh of every device of every process, axis 'data':
batches are sharded on it, everything else is replicated. A multi-process run (several hosts, or
several processes on one) is joined by `maybe_initialize`; afterwards `jax.devices()` lists the
devices of all processes, and each process reads back replicated values with `to_host`.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import os
import re
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Joins a multi-process run: explicit coordinator flags, or SLURM / Open MPI launches.

  Every process then sees all devices of the run in `jax.devices()`; a single process on one
  machine needs nothing. Processes other than 0 then log warnings and errors only. Under SLURM
  and Open MPI, JAX gives each process one GPU (its local rank): launch one task per GPU. With
  the flags, each process drives all the devices it sees (e.g. one process per host).
  """
  # srun sets SLURM_STEP_ID; a plain `python` inside an allocation (salloc) must not wait for
  # peers that were never started.
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ
  open_mpi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    lacking = [f"--{name}" for name, v in zip(("coordinator_address", "num_processes",
                                               "process_id"), explicit) if v is None]
    raise ValueError("A multi-process launch by flags needs all of --coordinator_address, "
                     f"--num_processes and --process_id; {' and '.join(lacking)} "
                     f"{'is' if len(lacking) == 1 else 'are'} missing "
                     "(SLURM and Open MPI need none).")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}.")
  if coordinator_address:
    host, _, port = coordinator_address.rpartition(":")
    if not (host and port.isdigit() and 1 <= int(port) <= 65535):
      raise ValueError(f"--coordinator_address must be HOST:PORT (process 0's host and a free "
                       f"port), got {coordinator_address!r}.")
  elif not (slurm or open_mpi):
    return
  elif open_mpi and "OMPI_MCA_orte_hnp_uri" not in os.environ:
    raise ValueError(
        "This Open MPI launch is one JAX cannot join by itself (Open MPI 5 sets no "
        "OMPI_MCA_orte_hnp_uri): start one process per host (mpirun --npernode 1) with "
        "--coordinator_address=HOST0:PORT --num_processes=N --process_id=I, e.g. through "
        "sh -c '... --process_id=$OMPI_COMM_WORLD_RANK' (README, several hosts).")
  # JAX's preemption service would take SIGTERM over, and nothing here acts on its notices: a
  # `kill` or a scheduler's SIGTERM must end a multi-process run as it ends a single process.
  if "jax_enable_preemption_service" in jax.config.values:  # an option JAX may drop
    jax.config.update("jax_enable_preemption_service", False)
  if coordinator_address:
    if process_id == 0 and "JAX_COORDINATOR_BIND_ADDRESS" not in os.environ:  # else binds there
      _check_coordinator_port_free(int(port))
    logging.info("Process %d of %d: waiting for all %d processes at %s (the same flags on each; "
                 "process 0 runs there).", process_id, num_processes, num_processes,
                 coordinator_address)
    # No cluster detection: inside an srun step it would pin this process to one GPU.
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               cluster_detection_method="deactivate")
    if jax.process_count() != num_processes:  # process 0's count won: the flags disagree
      raise ValueError(
          f"This process has --num_processes={num_processes}, but process 0 at "
          f"{coordinator_address} runs {jax.process_count()} processes: give every process "
          "the same --coordinator_address and --num_processes, and each its own --process_id.")
  else:
    _warn_of_idle_slurm_gpus()
    jax.distributed.initialize()
  logging.info("Process %d of %d: %d local devices, %d in all.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


def _check_coordinator_port_free(port: int) -> None:
  """Process 0 serves the run's coordinator on `port` of every interface ([::], or 0.0.0.0
  without IPv6); JAX's service crashed with a segmentation fault on a port in use (jax 0.10),
  e.g. a second process 0 on this host. Best effort: a port taken after the probe is not seen."""
  try:
    probe, address = socket.socket(socket.AF_INET6, socket.SOCK_STREAM), ("::", port)
  except OSError:  # a kernel without IPv6
    probe, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("", port)
  with probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is free
    try:
      probe.bind(address)
    except OSError as e:
      why = ("a port below 1024 needs root" if e.errno == errno.EACCES else
             "another program, or another process 0, holds it")
      raise ValueError(
          f"Process 0 cannot serve the coordinator on port {port} of this host: {e.strerror} "
          f"({why}). Choose a free port in --coordinator_address, the same for every "
          "process.") from None


def _warn_of_idle_slurm_gpus() -> None:
  """JAX gives each SLURM task the GPU of its local rank, so fewer tasks than GPUs on a node
  leave GPUs idle (srun --ntasks-per-node=1 --gpus-per-node=8 trains on 1 GPU per node)."""
  gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
  tasks = _slurm_tasks_on_this_node()
  if gpus.isdigit() and tasks is not None and tasks < int(gpus):
    logging.warning("This node has %s GPUs but runs %d tasks, and JAX gives each task one GPU: "
                    "%d stay idle. Launch one task per GPU (srun --ntasks-per-node=%s).",
                    gpus, tasks, int(gpus) - tasks, gpus)


def _slurm_tasks_on_this_node() -> int | None:
  """This node's entry of srun's tasks-per-node list, e.g. '8(x2),4' for nodes 0-2."""
  spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
  node = os.environ.get("SLURM_NODEID", "0")
  if not spec or not node.isdigit():
    return None
  per_node = []
  for entry in spec.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", entry.strip())
    if match is None:
      return None
    per_node += [int(match[1])] * int(match[2] or 1)
  return per_node[int(node)] if int(node) < len(per_node) else None


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places host values on every device. With several processes each passes its own copy,
  which must be the same on all: that is checked, as nothing else would notice a host that,
  say, decoded its data differently."""
  sharding = NamedSharding(mesh, P())
  tree = jax.tree.map(np.asarray, tree)
  if jax.process_count() > 1:
    _check_same_on_every_process(tree)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), tree)


def check_same_launch(identity: str) -> None:
  """Refuses a launch whose processes were given other settings (`identity`: their config and
  workdir) than process 0. Each would train on as told: with a learning rate of its own to
  other weights, unseen; waiting minutes for epochs another process does not run; saving into a
  workdir that is not the others', where the checkpoint never completes."""
  if jax.process_count() == 1:
    return
  differing = _differing_processes(hashlib.sha1(identity.encode()).digest())
  if differing:
    raise ValueError(
        f"Processes {differing} were started with another config or --workdir than process 0: "
        "give every process the same --config, --config.* flags and --workdir (one directory "
        "that every host reaches by the same path); only the data paths may differ.")


def _differing_processes(digest: bytes) -> list[int]:
  """The processes whose `digest` differs from process 0's."""
  digests = multihost_utils.process_allgather(np.frombuffer(digest, np.uint32))
  return [i for i, d in enumerate(digests) if not np.array_equal(d, digests[0])]


def _check_same_on_every_process(tree: PyTree) -> None:
  digest = hashlib.sha1()
  for x in jax.tree.leaves(tree):
    digest.update(f"{x.shape}{x.dtype}".encode())
    digest.update(x.tobytes())
  differing = _differing_processes(digest.digest())
  if differing:
    raise ValueError(
        f"Processes {differing} hold other values than process 0 for arrays every process must "
        "load alike (data splits, initial state, teacher): give every host the same files, "
        "and TensorFlow on all hosts or on none (its image decoder orders a folder's images "
        "otherwise).")


def to_host(tree: PyTree) -> PyTree:
  """Fetches replicated arrays (also those spanning several processes) as NumPy values;
  NumPy values stay as they are."""
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), tree)


def sum_on_host(metrics_list: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Sums of metric sums fetched from the device (per dispatch or eval batch), in float64 on
  the host."""
  fetched = to_host(metrics_list)
  return {k: float(sum(np.asarray(m[k], np.float64) for m in fetched)) for k in fetched[0]}


def prefetch_to_device(
    batches: Iterable[dict[str, np.ndarray]], size: int, sharding: jax.sharding.Sharding
) -> Iterator[dict[str, jax.Array]]:
  """Turns per-process NumPy batches into global jax.Arrays, keeping `size` transfers in flight.

  Each leaf's leading axis is this process's slice of the global batch, assembled with
  `jax.make_array_from_process_local_data(sharding, leaf)`; transfers are asynchronous, so
  queueing them ahead overlaps host-to-device copies with the step. Use
  `prefetch_to_device(ds.as_numpy_iterator(), 2, NamedSharding(mesh, P('data')))`.
  """
  queue = collections.deque()
  iterator = iter(batches)

  def enqueue(n: int) -> None:
    for batch in itertools.islice(iterator, n):
      queue.append(jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x), batch))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
