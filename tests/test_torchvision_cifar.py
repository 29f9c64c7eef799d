"""torchvision's CIFAR folders (mdistiller's data) as `config.data.folder`: the pickled files,
written here as Python 2 wrote them, read into the same arrays, safely, with clear errors."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from helpers import python2_pickle, run_python, run_script, write_torchvision_cifar
from sortkd_jax import augment, checkpoint, models
from sortkd_jax import input_pipeline as ip

NAMES = [f"class_{i:02d}" for i in range(100)]


def _cifar(root, n_train=10, n_test=6, variant="cifar-100-python", names=NAMES, seed=0):
  rng = np.random.default_rng(seed)
  images = {"train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
            "test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)}
  labels = {s: rng.integers(0, len(names), len(x)) for s, x in images.items()}
  folder = write_torchvision_cifar(str(root), images, labels, names, variant)
  return folder, images, labels


@pytest.mark.parametrize("variant,num_classes", [("cifar-100-python", 100),
                                                 ("cifar-10-batches-py", 10)])
def test_a_cifar_folder_gives_its_images_labels_and_classes(tmp_path, variant, num_classes):
  folder, images, labels = _cifar(tmp_path, variant=variant, names=NAMES[:num_classes])
  for split in ("train", "test"):
    got = ip.load_array_split(folder=folder, split=split)
    np.testing.assert_array_equal(got.images, images[split])  # CIFAR-10: five batches in order
    np.testing.assert_array_equal(got.labels, labels[split])
    assert got.labels.dtype == np.int32 and got.num_classes == num_classes
    assert got.class_names == tuple(NAMES[:num_classes])


def test_a_row_is_the_red_then_green_then_blue_plane_each_row_major(tmp_path):
  """The layout of the CIFAR page, independently of the writer above: pixel (r, c) of channel
  ch is byte ch·1024 + r·32 + c of the image's row."""
  row = (np.arange(3072) * 7 % 251).astype(np.uint8)
  folder = str(tmp_path / "cifar-100-python")
  os.makedirs(folder)
  for name in ("train", "test"):
    with open(os.path.join(folder, name), "wb") as f:
      f.write(python2_pickle({"data": row[None], "fine_labels": [3]}))
  with open(os.path.join(folder, "meta"), "wb") as f:
    f.write(python2_pickle({"fine_label_names": NAMES}))
  image = ip.load_array_split(folder=folder, split="train").images[0]
  for r, c, ch in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (31, 31, 0), (0, 0, 1), (5, 17, 1),
                   (0, 0, 2), (31, 30, 2)]:
    assert image[r, c, ch] == row[ch * 1024 + r * 32 + c]


def test_a_cifar_file_cannot_run_code(tmp_path):
  folder, _, _ = _cifar(tmp_path)
  marker = tmp_path / "ran"
  with open(os.path.join(folder, "train"), "wb") as f:  # pickle's classic exploit: os.system
    f.write(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
  with pytest.raises(ValueError, match=r"train as a CIFAR file .*names os.system"):
    ip.load_array_split(folder=folder, split="train")
  assert not marker.exists()


def test_damaged_or_missing_files_say_to_unpack_the_archive_again(tmp_path):
  folder, _, _ = _cifar(tmp_path)
  path = os.path.join(folder, "train")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:  # an interrupted copy
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f"Cannot read {path} .*cut short: unpack "
                     r"cifar-100-python.tar.gz again"):
    ip.load_array_split(folder=folder, split="train")
  os.remove(os.path.join(folder, "test"))
  with pytest.raises(FileNotFoundError, match="test is missing from the CIFAR folder"):
    ip.load_array_split(folder=folder, split="test")
  with open(path, "wb") as f:  # a pickle of something else
    f.write(python2_pickle({"data": [1, 2], "fine_labels": [0, 1]}))
  with pytest.raises(ValueError, match=r"does not hold uint8 'data' \[N, 3·H·W\]"):
    ip.load_array_split(folder=folder, split="train")


def test_the_wrong_folder_split_or_size_says_what_to_pass(tmp_path):
  folder, _, _ = _cifar(tmp_path)
  # mdistiller's data root, which holds the folder:
  with pytest.raises(FileNotFoundError, match=f"pass --config.data.folder={folder}"):
    ip.load_array_split(folder=str(tmp_path), split="train")
  archive = tmp_path / "cifar-100-python.tar.gz"
  archive.write_bytes(b"\x1f\x8b")
  with pytest.raises(FileNotFoundError, match="is a file, not a folder: unpack an archive "
                     "first .*tar xzf cifar-100-python.tar.gz"):
    ip.load_array_split(folder=str(archive), split="train")
  with pytest.raises(ValueError, match=r"has the splits \['test', 'train'\], not 'validation'"):
    ip.load_array_split(folder=folder, split="validation")
  with pytest.raises(ValueError, match=r"images are \(32, 32, 3\), expected \(64, 64, 3\)"):
    ip.load_array_split(folder=folder, split="train", image_size=64)


def test_labels_outside_the_class_names_are_refused(tmp_path):
  folder, _, _ = _cifar(tmp_path, names=NAMES[:10])
  with open(os.path.join(folder, "meta"), "wb") as f:
    f.write(python2_pickle({"fine_label_names": NAMES[:3]}))
  with pytest.raises(ValueError, match=r"labels lie outside \[0, 3\)"):
    ip.load_array_split(folder=folder, split="train")


def test_read_without_tensorflow_or_pillow(tmp_path):
  """As on the GPU machines, which have neither."""
  folder, images, _ = _cifar(tmp_path)
  out = run_python("-c", f"""
import sys
sys.modules.update(tensorflow=None, tensorflow_datasets=None, PIL=None)
from sortkd_jax import input_pipeline
print(int(input_pipeline.load_array_split(folder={folder!r}, split="test").images.sum()))
""")
  assert out.returncode == 0, out.stderr
  assert int(out.stdout) == int(images["test"].sum())


def test_eval_script_on_a_cifar_folder(tmp_path):
  """scripts/eval.py --config.data.folder=<cifar-100-python>: the test loss of these images."""
  folder, images, labels = _cifar(tmp_path)
  model = models.create_model("resnet8", 100, rngs=nnx.Rngs(0))
  checkpoint.save_model(str(tmp_path / "model"), model, arch="resnet8", num_classes=100)
  out = run_script("eval.py", "--checkpoint", tmp_path / "model", "--config",
                   "configs/cifar_kd.py:res56_res20", f"--config.data.folder={folder}",
                   "--config.eval_batch_size=4")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  model.eval()
  logits = np.asarray(model(augment.normalize(images["test"], augment.CIFAR_MEAN,
                                              augment.CIFAR_STD)), np.float64)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  loss = -log_probs[np.arange(len(labels["test"])), labels["test"]].mean()
  assert result["test_examples"] == len(labels["test"])
  np.testing.assert_allclose(result["test_loss"], loss, rtol=1e-4)
