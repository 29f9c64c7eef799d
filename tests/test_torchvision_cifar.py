"""torchvision's CIFAR folders (mdistiller's data) as `config.data.folder`: the pickled files,
written here as Python 2 wrote them, read into the same arrays, safely, with clear errors."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from helpers import python2_pickle, run_python, run_script, write_torchvision_cifar
from sortkd_jax import augment, checkpoint, data_sources, models
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
  rows = np.stack([row, row[::-1]])  # pickled in Fortran order: the same rows come back
  with open(os.path.join(folder, "train"), "wb") as f:
    f.write(python2_pickle({"data": np.asfortranarray(rows), "fine_labels": [3, 4]}))
  np.testing.assert_array_equal(
      ip.load_array_split(folder=folder, split="train").images.reshape(2, 32, 32, 3),
      rows.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))


def test_a_cifar_file_cannot_run_code(tmp_path):
  folder, _, _ = _cifar(tmp_path)
  marker = tmp_path / "ran"
  with open(os.path.join(folder, "train"), "wb") as f:  # pickle's classic exploit: os.system
    f.write(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
  with pytest.raises(ValueError, match=r"train as a CIFAR file .*names os.system"):
    ip.load_array_split(folder=folder, split="train")
  assert not marker.exists()


# A pickled object array whose dtype state drops its flags: its bytes would be read as pointers.
_OBJECT_ARRAY = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R("
                 b"K\x01(K\x02tcnumpy\ndtype\nU\x02O8K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff"
                 b"\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x10" + b"A" * 16 + b"tb")
# numpy.ndarray((2, 3072), 'u1', buffer, offset=-2**31): a uint8 array reading outside its bytes.
_OUT_OF_BOUNDS_ARRAY = (b"cnumpy\nndarray\n((M\x02\x00M\x00\x0ctU\x02u1B\x00\x18\x00\x00"
                        + bytes(6144) + b"J\x00\x00\x00\x80tR")


def test_a_file_cannot_make_numpy_read_other_memory(tmp_path):
  """Each would crash the interpreter if NumPy built it; here each is a clean error."""
  folder, _, _ = _cifar(tmp_path)
  with open(os.path.join(folder, "meta"), "wb") as f:
    f.write(b"\x80\x02}(U\x10fine_label_names" + _OBJECT_ARRAY + b"u.")
  with open(os.path.join(folder, "train"), "wb") as f:
    f.write(b"\x80\x03}(U\x04data" + _OUT_OF_BOUNDS_ARRAY + b"U\x0bfine_labels](K\x00K\x01eu.")
  out = run_python("-c", f"""
from sortkd_jax import torchvision_cifar as tc
for name in ("meta", "train"):
  try:
    tc._read({folder!r} + "/" + name, tc.LAYOUTS[0])
  except ValueError as e:
    print(e)
""")
  assert out.returncode == 0, out.stderr
  meta, train = out.stdout.strip().splitlines()
  assert "meta as a CIFAR file (UnpicklingError: it holds a NumPy array other than a plain " \
      "uint8 one)" in meta
  assert "train as a CIFAR file (TypeError" in train


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
  for content in ({"data": [1, 2], "fine_labels": [0, 1]},  # pickles of something else
                  {"data": np.zeros((2, 3072), np.uint8), "fine_labels": 5},
                  {"data": np.zeros((2, 3072), np.uint8), "fine_labels": "ab"},
                  {"data": np.zeros((2, 3000), np.uint8), "fine_labels": [0, 1]}):
    with open(path, "wb") as f:
      f.write(python2_pickle(content))
    with pytest.raises(ValueError, match=r"does not hold uint8 'data' \[N, 3·H·W\] and a list"):
      ip.load_array_split(folder=folder, split="train")
  for names in (5, "abc", []):
    with open(os.path.join(folder, "meta"), "wb") as f:
      f.write(python2_pickle({"fine_label_names": names}))
    with pytest.raises(ValueError, match="meta has no list of class names 'fine_label_names'"):
      ip.load_array_split(folder=folder, split="train")


def test_damaged_bytes_give_an_error_naming_the_file(tmp_path):
  """Bytes changed anywhere in a file: read as it was, or refused with the file's name."""
  folder, _, _ = _cifar(tmp_path, n_train=2, names=NAMES[:3])
  path = os.path.join(folder, "train")
  with open(path, "rb") as f:
    good = f.read()
  rng = np.random.default_rng(0)
  for _ in range(300):
    damaged = bytearray(good)
    for i in rng.integers(0, len(good), rng.integers(1, 4)):
      damaged[i] = rng.integers(0, 256)
    with open(path, "wb") as f:
      f.write(damaged)
    try:
      ip.load_array_split(folder=folder, split="train")
    except ValueError as e:
      assert path in str(e) and "unpack cifar-100-python.tar.gz again" in str(e)


def test_the_wrong_folder_split_or_size_says_what_to_pass(tmp_path, monkeypatch):
  folder, _, _ = _cifar(tmp_path)
  # mdistiller's data root, which holds the folder (and here CIFAR-10's too):
  with pytest.raises(FileNotFoundError, match=f"pass --config.data.folder={folder}\\.$"):
    ip.load_array_split(folder=str(tmp_path), split="train")
  cifar10, _, _ = _cifar(tmp_path, variant="cifar-10-batches-py", names=NAMES[:10])
  with pytest.raises(FileNotFoundError, match=f"pass --config.data.folder={cifar10} or {folder}"):
    ip.load_array_split(folder=str(tmp_path), split="train")
  archive = tmp_path / "cifar-100-python.tar.gz"
  archive.write_bytes(b"\x1f\x8b")
  with pytest.raises(FileNotFoundError, match="is a file, not a folder: unpack it first "
                     r"\(tar xzf cifar-100-python.tar.gz\)"):
    ip.load_array_split(folder=str(archive), split="train")
  with pytest.raises(FileNotFoundError, match="is one of torchvision's CIFAR files: pass their "
                     f"folder, --config.data.folder={folder}"):
    ip.load_array_split(folder=os.path.join(folder, "train"), split="train")
  with pytest.raises(FileNotFoundError, match="cifar-100-python does not exist: unpack "
                     "cifar-100-python.tar.gz"):
    ip.load_array_split(folder=f"{tmp_path}/elsewhere/cifar-100-python/", split="test")
  with pytest.raises(ValueError, match=r"has the splits \['test', 'train'\], not 'validation'.*"
                     "config.data.test_split=test"):
    ip.load_array_split(folder=folder, split="validation")
  with pytest.raises(ValueError, match="is torchvision's CIFAR folder: the CIFAR recipes read it"):
    data_sources.split_info(folder=folder, split="train")  # as an ImageNet recipe's stream would
  monkeypatch.setenv("HOME", str(tmp_path))  # a shell leaves --config.data.folder=~/... as it is
  assert ip.load_array_split(folder="~/cifar-100-python", split="test").num_classes == 100
  with pytest.raises(ValueError, match=r"images are \(32, 32, 3\), expected \(64, 64, 3\)"):
    ip.load_array_split(folder=folder, split="train", image_size=64)


def test_an_image_folder_holding_a_file_named_meta_stays_an_image_folder(tmp_path):
  os.makedirs(tmp_path / "train" / "cat")
  (tmp_path / "meta").write_text("notes")
  with pytest.raises(ValueError, match="Image folder split .* has no images"):
    ip.load_array_split(folder=str(tmp_path), split="train")


def test_labels_outside_the_class_names_are_refused(tmp_path):
  folder, _, labels = _cifar(tmp_path, names=NAMES[:10])
  top = int(labels["train"].max())  # the names end just below it: it alone is outside
  with open(os.path.join(folder, "meta"), "wb") as f:
    f.write(python2_pickle({"fine_label_names": NAMES[:top]}))
  outside = int((labels["train"] == top).sum())
  with pytest.raises(ValueError, match=rf"train has {outside} labels outside the {top} classes "
                     rf"of .*meta \(e.g. {top}\): unpack cifar-100-python.tar.gz again"):
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
