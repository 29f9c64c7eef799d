"""Data parallelism: 1 device, 4 devices and 2 processes × 2 devices train exactly alike.

Each run is a subprocess with simulated CPU devices. Multi-process runs find each other through
`jax.distributed.initialize` on a free localhost port (`distributed.maybe_initialize`),
share one workdir as on a shared filesystem, and must leave the same parameters, metrics written
once (process 0) and one complete orbax checkpoint.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from helpers import REPO, read_metrics

# A backstop against a hang only (a failing process ends the wait at once): on a 2-core machine
# under heavy load the 4-device fixture's run took 310 s.
TIMEOUT_S = 900

# Parameters after a run's 3 steps on 1 vs 4 devices, or 1 vs 2 processes: XLA:CPU sums each
# device's share of the batch in order (jaxlib 0.10 with its YNNPACK fusions off,
# sortkd_jax/__init__.py), so 4 times as many terms on 1 device: 2.2e-5 apart at most here.
PARAMS_ATOL = 5e-5

# argv: out_dir workdir teacher num_epochs [coordinator num_processes process_id]
RUN = textwrap.dedent("""
    import hashlib, os, sys, numpy as np, jax, tensorflow_datasets as tfds
    from flax import nnx
    from configs import cifar_kd
    from sortkd_jax import checkpoint, distributed, input_pipeline, models, train
    out, workdir, teacher, num_epochs = sys.argv[1:5]
    if len(sys.argv) > 5:
      distributed.maybe_initialize(sys.argv[5], int(sys.argv[6]), int(sys.argv[7]))
    elif not os.path.exists(teacher):  # the first, single-process run writes the teacher
      checkpoint.save_model(teacher, models.create_model("resnet8", 100, rngs=nnx.Rngs(42)),
                            arch="resnet8", num_classes=100)
    config = cifar_kd.get_config("res56_res20,runlocal")
    config.student.name = config.teacher.name = "resnet8"
    config.teacher.checkpoint = teacher
    config.num_epochs = int(num_epochs)
    config.data.max_train_examples = 40
    config.data.max_test_examples = 30
    config.data.download = False  # a multi-process run does not prepare datasets
    config.eval_batch_size = 10  # not a multiple of 4 devices: evaluation rounds it up
    config.steps_per_dispatch = 2
    with tfds.testing.mock_data(num_examples=64):
      splits = input_pipeline.load_splits(config.data)
      result = train.train_and_evaluate(config, workdir)
    digest = hashlib.sha256()
    for s in splits:
      digest.update(s.images.tobytes()); digest.update(s.labels.tobytes())
    pid = jax.process_index()
    np.savez(f"{out}/params{pid}.npz", *jax.tree.leaves(result["state"].params))
    print("DATA", digest.hexdigest())
    print("PROCESS", pid, "OF", jax.process_count(), "DEVICES", jax.local_device_count(),
          jax.device_count())
""")


def _free_port() -> int:
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(local_devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
  return env


def _launch(script, args, local_devices, log_prefix):
  """Starts `script`; stdout/stderr go to files (no pipe can fill up and block)."""
  with open(f"{log_prefix}.out", "w") as out, open(f"{log_prefix}.err", "w") as err:
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            env=_env(local_devices), stdout=out, stderr=err, cwd=REPO, text=True)
  proc.logs = (log_prefix + ".out", log_prefix + ".err")
  return proc


def _wait_all(procs):
  """Waits (TIMEOUT_S in all) for every process; on a failure or timeout kills the others.

  Returns their stdouts; fails with the stderr of each process that did not exit 0."""
  deadline, killed = time.monotonic() + TIMEOUT_S, set()
  try:
    pending = list(procs)
    while pending and time.monotonic() < deadline:
      pending = [p for p in pending if p.poll() is None]
      if any(p.returncode for p in procs if p not in pending):
        break  # one failed: the others would wait for it in a collective
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
        killed.add(p)
  logs = [[open(f).read() for f in p.logs] for p in procs]
  failed = [f"process {i}: " + (f"still running after {TIMEOUT_S} s (or after another process "
                                "failed), killed" if p in killed else f"exit {p.returncode}")
            + f"\n{err[-3000:]}"
            for i, (p, (_, err)) in enumerate(zip(procs, logs)) if p.returncode != 0]
  assert not failed, "\n".join(failed)
  return [out for out, _ in logs]


def _params(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _epochs(workdir):
  return [r for r in read_metrics(workdir) if r["kind"] == "epoch"]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """The reference run, 1 process × 4 devices; it writes the teacher the other runs read."""
  root = tmp_path_factory.mktemp("parallel")
  single = root / "single"
  single.mkdir()
  [out] = _wait_all([_launch(RUN, [single, single / "run", root / "teacher", 1], 4,
                             str(single / "log"))])
  assert "PROCESS 0 OF 1 DEVICES 4 4" in out
  return root, out


def test_one_and_four_devices_train_the_same(four_devices):
  root, _ = four_devices
  one = root / "one"
  one.mkdir()
  [out] = _wait_all([_launch(RUN, [one, one / "run", root / "teacher", 1], 1, str(one / "log"))])
  assert "PROCESS 0 OF 1 DEVICES 1 1" in out
  epoch1, epoch4 = (_epochs(root / name / "run")[0] for name in ("one", "single"))
  np.testing.assert_allclose(epoch4["train_loss"], epoch1["train_loss"], rtol=1e-5)
  np.testing.assert_allclose(epoch4["test_loss"], epoch1["test_loss"], rtol=1e-4)
  params1, params4 = _params(one / "params0.npz"), _params(root / "single" / "params0.npz")
  assert len(params1) == len(params4)
  for a, b in zip(params1, params4):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=PARAMS_ATOL)


def test_two_processes_train_like_one_with_four_devices(four_devices):
  root, ref_out = four_devices
  teacher, single, multi = root / "teacher", root / "single", root / "multi"
  multi.mkdir()

  address = f"localhost:{_free_port()}"
  outs = _wait_all([_launch(RUN, [multi, multi / "run", teacher, 1, address, 2, pid], 2,
                            str(multi / f"log{pid}")) for pid in range(2)])
  for pid, out in enumerate(outs):
    assert f"PROCESS {pid} OF 2 DEVICES 2 4" in out
  data = {line for out in [ref_out, *outs] for line in out.splitlines() if line.startswith("DATA")}
  assert len(data) == 1, data  # mock_data gives every process the same examples

  # Same training: every process ends with the 4-device run's parameters.
  want = _params(single / "params0.npz")
  for pid in range(2):
    got = _params(multi / f"params{pid}.npz")
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=PARAMS_ATOL)

  # Logs: written once, by process 0, with the same numbers.
  ref, records = read_metrics(single / "run"), read_metrics(multi / "run")
  assert len(records) == len(ref)
  start = [(r["devices"], r["processes"]) for r in records if r["kind"] == "start"]
  assert start == [(4, 2)] and [(r["devices"], r["processes"]) for r in ref
                                if r["kind"] == "start"] == [(4, 1)]
  epochs = _epochs(multi / "run")
  assert len(epochs) == 1 and epochs[0]["epoch"] == 1
  ref_epoch = _epochs(single / "run")[0]
  for key in ("train_loss", "test_loss"):
    np.testing.assert_allclose(epochs[0][key], ref_epoch[key], rtol=1e-5)
  assert epochs[0]["test_top1"] == ref_epoch["test_top1"]
  assert json.load(open(multi / "run" / "config.json"))["num_epochs"] == 1

  # One complete checkpoint for epoch 1, written by both processes, restorable here (1 device,
  # 1 process: another topology than the one that saved it).
  from sortkd_jax import checkpoint
  ckpt_dir = multi / "run" / checkpoint.TRAIN_CHECKPOINT_DIR
  assert sorted(os.listdir(ckpt_dir)) == ["1"], os.listdir(ckpt_dir)  # no leftover tmp dirs
  ckpt = checkpoint.TrainCheckpointer(str(ckpt_dir))
  try:
    assert ckpt.latest_epoch() == 1
    state, meta = ckpt.restore(1)
  finally:
    ckpt.close()
  assert meta["step"] == int(state["step"]) == 3 and meta["test_top1"] == epochs[0]["test_top1"]
  import jax
  restored = jax.tree.leaves(state["params"])
  for a, b in zip(restored, want):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=PARAMS_ATOL)

  # Resumed by the same launch with one more epoch: every process checks the run's config.json
  # while process 0 is about to rewrite it.
  address = f"localhost:{_free_port()}"
  _wait_all([_launch(RUN, [multi, multi / "run", teacher, 2, address, 2, pid], 2,
                     str(multi / f"resume{pid}")) for pid in range(2)])
  assert [r["epoch"] for r in _epochs(multi / "run")] == [1, 2]
  assert json.load(open(multi / "run" / "config.json"))["num_epochs"] == 2


REPLICATE = textwrap.dedent("""
    import sys, numpy as np
    from sortkd_jax import distributed
    address, pid = sys.argv[1], int(sys.argv[2])
    distributed.maybe_initialize(address, 2, pid)
    mesh = distributed.make_mesh()
    same = distributed.replicate({"x": np.arange(6.0), "n": np.int32(3)}, mesh)
    print("SAME", float(same["x"].addressable_shards[0].data.sum()), int(same["n"]))
    try:  # process 1 decoded its split differently
      distributed.replicate({"x": np.arange(6.0) + pid, "n": np.int32(3)}, mesh)
    except ValueError as e:
      print("REFUSED", e)
    distributed.check_same_launch("lr 0.05")
    try:  # process 1 was given another --config.lr
      distributed.check_same_launch(f"lr {0.05 if pid == 0 else 0.5}")
    except ValueError as e:
      print("LAUNCH REFUSED", e)
""")


def test_replicated_host_values_must_be_the_same_on_every_process(tmp_path):
  """Each process places its own copy of a replicated array (a data split, the initial state):
  a copy that differs is refused on every process, not silently mixed across devices."""
  address = f"localhost:{_free_port()}"
  outs = _wait_all([_launch(REPLICATE, [address, pid], 1, str(tmp_path / f"log{pid}"))
                    for pid in range(2)])
  for out in outs:
    assert "SAME 15.0 3" in out
    assert "REFUSED Processes [1] hold other values than process 0" in out, out
    assert ("LAUNCH REFUSED Processes [1] were started with another config or --workdir than "
            "process 0: give every process the same --config") in out, out


def test_processes_given_other_workdirs_are_refused_at_start(four_devices):
  """Each process saved into its own workdir: the first checkpoint never completed, and both
  waited without a word (helper's audit). Now both end at start, before any data is read."""
  root, _ = four_devices
  address = f"localhost:{_free_port()}"
  for pid in range(2):
    os.makedirs(root / f"own{pid}")
  procs = [_launch(RUN, [root / f"own{pid}", root / f"own{pid}" / "run", root / "teacher", 1,
                         address, 2, pid], 2, str(root / f"own_log{pid}")) for pid in range(2)]
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  errors = [open(p.logs[1]).read() for p in procs]
  assert codes == [1, 1], errors
  for err in errors:
    assert "were started with another config or --workdir than process 0" in err, err[-3000:]
  assert not any(os.path.exists(root / f"own{pid}" / "run" / "checkpoints" / "1")
                 for pid in range(2))


# ----------------------------------------------------------------------------- tf.data (ImageNet)

STREAM = textwrap.dedent("""
    import json, sys, numpy as np, jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sortkd_jax import distributed, imagenet_input
    folder, address, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    distributed.maybe_initialize(address, 2, pid)
    mesh = distributed.make_mesh()
    sharded = NamedSharding(mesh, P("data"))
    gather = jax.jit(lambda b: b, out_shardings=NamedSharding(mesh, P()))
    common = dict(name=None, folder=folder, global_batch_size=4, image_size=16)
    def example(label, image, mask):  # (label, image number, real example)
      return label, int(np.round((image.mean() - 20) / 30)), mask
    out = {}
    val = imagenet_input.imagenet_eval_dataset(split="val", resize_size=20, **common)
    train = imagenet_input.imagenet_train_dataset(split="train", shuffle_buffer=8, **common)
    for split, ds in (("val", val), ("train", train.take(2))):
      out[split] = []
      for b in distributed.prefetch_to_device(ds.as_numpy_iterator(), 2, sharded):
        assert b["image"].shape == (4, 16, 16, 3) and len(b["image"].addressable_shards) == 2
        g = distributed.to_host(gather(b))  # the global batch, read back on this process
        mask = g["mask"] if "mask" in g else np.ones(4, bool)
        out[split].append(sorted(map(example, g["label"].tolist(), g["image"], mask.tolist())))
    print("BATCHES", json.dumps(out))
""")

_STREAM_CLASSES = ("ant", "bee")


def _write_stream_folder(root, tf):
  """val: 7 images (the last global batch is padded), train: 8; mixed sizes and formats.

  Image i is filled with 20 + 30·i, so it can be recognised after any crop and resize."""
  sizes = [(40, 30), (30, 50), (24, 24), (64, 20), (33, 47), (20, 20), (50, 60), (28, 36)]
  for split, count in (("val", 7), ("train", 8)):
    for i in range(count):
      d = root / split / _STREAM_CLASSES[i % 2]
      d.mkdir(parents=True, exist_ok=True)
      image = np.full((*sizes[i], 3), 20 + 30 * i, np.uint8)
      png = i % 3 != 0
      data = tf.io.encode_png(image) if png else tf.io.encode_jpeg(image, quality=100)
      tf.io.write_file(str(d / f"{i}{'.png' if png else '.jpg'}"), data)


def test_two_processes_assemble_the_global_tf_data_batches(tmp_path):
  """Each process reads its shard; the global batches hold what one process would read."""
  import tensorflow as tf
  from sortkd_jax import imagenet_input

  _write_stream_folder(tmp_path, tf)
  address = f"localhost:{_free_port()}"
  outs = _wait_all([_launch(STREAM, [tmp_path, address, pid], 2, str(tmp_path / f"log{pid}"))
                    for pid in range(2)])
  got = [json.loads(out.split("BATCHES ", 1)[1]) for out in outs]
  assert got[0] == got[1]  # every process sees the same global batches
  got = {split: [[tuple(e) for e in batch] for batch in batches]
         for split, batches in got[0].items()}

  # One process reading the whole split: the same examples in each global eval batch.
  common = dict(name=None, folder=str(tmp_path), global_batch_size=4, image_size=16,
                process_index=0, process_count=1)
  want = [sorted((int(l), int(np.round((im.mean() - 20) / 30)), bool(m))
                 for l, im, m in zip(b["label"], b["image"], b["mask"]))
          for b in imagenet_input.imagenet_eval_dataset(split="val", resize_size=20,
                                                        **common).as_numpy_iterator()]
  assert got["val"] == want
  assert sum(m for batch in got["val"] for _, _, m in batch) == 7
  # Train: each process shuffles its own shard; the first 2 global batches are one epoch.
  assert sorted(e for batch in got["train"] for e in batch) == sorted((i % 2, i, True)
                                                                       for i in range(8))


# ----------------------------------------------------------------------------- ending a run

# argv: address process_id mode. Joins, then process 1 raises a ValueError ("fail") or a
# TypeError ("crash"), or both sleep ("sleep").
JOIN_THEN = textwrap.dedent("""
    import sys, time, numpy as np
    from jax.experimental import multihost_utils
    from sortkd_jax import cli, distributed
    address, pid, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.argv = sys.argv[:1]
    def main():
      distributed.maybe_initialize(address, 2, pid)
      multihost_utils.process_allgather(np.int32(pid))  # collectives set up, as in a run
      print("JOINED", flush=True)
      if pid == 1 and mode == "fail":
        raise ValueError("bad data on this host")
      if pid == 1 and mode == "crash":
        raise TypeError("a bug")
      if mode == "sleep":
        time.sleep(120)
      multihost_utils.process_allgather(np.int32(pid))  # process 0 waits for process 1 here
    cli.run(main)
""")


@contextlib.contextmanager
def _two_joined(tmp_path, mode):
  """Two processes of JOIN_THEN, once both have joined; killed on the way out if still alive."""
  address = f"localhost:{_free_port()}"
  procs = [_launch(JOIN_THEN, [address, pid, mode], 1, str(tmp_path / f"log{pid}"))
           for pid in range(2)]
  try:
    deadline = time.monotonic() + 180  # 10-15 s each under heavy load on 2 cores
    joined = lambda p: "JOINED" in open(p.logs[0]).read()
    while not all(map(joined, procs)):
      assert time.monotonic() < deadline, "the processes did not join"
      assert all(p.poll() is None or joined(p) for p in procs), "a process ended before joining"
      time.sleep(0.2)
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _ended_within(procs, seconds):
  deadline = time.monotonic() + seconds
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(0.2)
  return all(p.poll() is not None for p in procs)


@pytest.mark.parametrize("mode,error", [("fail", "error: bad data on this host"),
                                        ("crash", "error: the traceback above")])
def test_an_error_in_one_process_ends_every_process(tmp_path, mode, error):
  """Not after JAX's 5-minute shutdown barrier: the failing process leaves at once, and the
  one waiting for it in a collective fails and leaves too, each with one error line."""
  with _two_joined(tmp_path, mode) as procs:
    assert _ended_within(procs, 120)
  errors = [open(p.logs[1]).read() for p in procs]
  assert [p.returncode for p in procs] == [1, 1], errors
  assert f"{error} (process 1 of 2;" in errors[1]
  assert ("TypeError: a bug" in errors[1]) == (mode == "crash")
  assert "(process 0 of 2; another process's failure shows here" in errors[0]


def test_sigterm_ends_a_process_of_a_multi_process_run(tmp_path):
  """JAX's preemption service would catch it and let the run go on."""
  import signal
  with _two_joined(tmp_path, "sleep") as procs:
    procs[1].send_signal(signal.SIGTERM)
    assert _ended_within(procs[1:], 10)
    assert procs[1].returncode == -signal.SIGTERM
