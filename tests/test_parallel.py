"""Data parallelism: the same global batch gives the same training on 1 and on 4 devices."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = textwrap.dedent("""
    import sys, numpy as np, jax, tensorflow_datasets as tfds
    from flax import nnx
    from configs import cifar_kd
    from sortkd_jax import checkpoint, models, train
    out, teacher = sys.argv[1], sys.argv[2]
    checkpoint.save_model(teacher, models.create_model("resnet8", 100, rngs=nnx.Rngs(42)),
                          arch="resnet8", num_classes=100)
    config = cifar_kd.get_config("res56_res20,runlocal")
    config.student.name = config.teacher.name = "resnet8"
    config.teacher.checkpoint = teacher
    config.num_epochs = 1
    config.data.max_train_examples = 40
    config.data.max_test_examples = 30
    config.eval_batch_size = 10  # not a multiple of 4: evaluation rounds it up
    with tfds.testing.mock_data(num_examples=64):
      result = train.train_and_evaluate(config, out + "/run")
    leaves = jax.tree.leaves(result["state"].params)
    np.savez(out + "/params.npz", *leaves)
    print("DEVICES", jax.device_count())
""")


def run_with_devices(n, tmp_path):
  out = tmp_path / f"dev{n}"
  out.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
  proc = subprocess.run([sys.executable, "-c", RUN, str(out), str(out / "teacher")], env=env,
                        capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"DEVICES {n}" in proc.stdout
  records = [json.loads(l) for l in open(out / "run" / "metrics.jsonl")]
  epoch = [r for r in records if r["kind"] == "epoch"][0]
  with np.load(out / "params.npz") as f:
    return epoch, [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_one_and_four_devices_train_the_same(tmp_path):
  epoch1, params1 = run_with_devices(1, tmp_path)
  epoch4, params4 = run_with_devices(4, tmp_path)
  np.testing.assert_allclose(epoch4["train_loss"], epoch1["train_loss"], rtol=1e-5)
  np.testing.assert_allclose(epoch4["test_loss"], epoch1["test_loss"], rtol=1e-4)
  assert len(params1) == len(params4)
  for a, b in zip(params1, params4):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
