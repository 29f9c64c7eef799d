"""Input pipelines (spec §7.3): split arrays, image folders + cache, ImageNet tf.data, prefetch."""

import functools
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sortkd_jax import data_sources as sources, imagenet_input as imagenet
from sortkd_jax import input_pipeline as ip

CLASSES = ("cat", "ant", "bee")  # created unsorted; label ids follow sorted names


def _write_image(path: str, image: np.ndarray) -> None:
  if path.endswith(".png"):
    tf.io.write_file(path, tf.io.encode_png(image))
  else:
    tf.io.write_file(path, tf.io.encode_jpeg(image, quality=100))


def _colour(k: int, i: int) -> int:
  """A constant pixel value identifying class k (in CLASSES order) and image i."""
  return 1 + 60 * k + i


def _make_folder(root, per_split=(("train", 4), ("test", 2)), size=(32, 32), ext=".png") -> str:
  for split, count in per_split:
    for k, name in enumerate(CLASSES):
      os.makedirs(root / split / name)
      for i in range(count):
        image = np.full((*size, 3), _colour(k, i), np.uint8)
        _write_image(str(root / split / name / f"{i:04d}{ext}"), image)
  return str(root)


def _cut_short(path: str) -> None:
  """Keeps the first half of the file, as an interrupted copy would."""
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


# ----------------------------------------------------------------------------- whole-split arrays


def test_mock_cifar100_split():
  with tfds.testing.mock_data(num_examples=20):
    split = ip.load_array_split(name="cifar100", split="train")
  assert split.images.shape == (20, 32, 32, 3) and split.images.dtype == np.uint8
  assert split.labels.shape == (20,) and split.labels.dtype == np.int32
  assert split.num_classes == 100 and len(split.class_names) == 100
  assert split.labels.min() >= 0 and split.labels.max() < 100


def test_mock_cifar100_wrong_image_size():
  with tfds.testing.mock_data(num_examples=4), pytest.raises(ValueError, match=r"\(28, 28, 3\)"):
    ip.load_array_split(name="cifar100", split="test", image_size=28)


def test_unprepared_tfds_dataset_says_how_to_provide_data(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.folder") as err:
    ip.load_array_split(name="cifar10", split="test", data_dir=str(tmp_path))
  assert str(tmp_path) in str(err.value) and "config.data.data_dir" in str(err.value)
  assert "torchvision's CIFAR folder, as it is (e.g. mdistiller's data/cifar-100-python)" in str(
      err.value)
  with pytest.raises(FileNotFoundError, match="config.data.folder") as err:  # not for ImageNet
    sources.split_info(name="imagenet2012", split="validation", data_dir=str(tmp_path))
  assert "CIFAR" not in str(err.value)


def test_image_folder_labels_follow_sorted_class_dirs_and_cache(tmp_path, monkeypatch, caplog):
  folder = _make_folder(tmp_path / "data")
  cache = str(tmp_path / "cache")
  split = ip.load_array_split(folder=folder, split="train", cache_dir=cache)
  assert split.num_classes == 3 and split.class_names == ("ant", "bee", "cat")
  assert split.images.shape == (12, 32, 32, 3)
  k = (split.images[:, 0, 0, 0].astype(int) - 1) // 60  # which CLASSES entry wrote each image
  assert (split.images == split.images[:, :1, :1, :1]).all()
  np.testing.assert_array_equal(split.labels, [sorted(CLASSES).index(CLASSES[j]) for j in k])
  assert len(os.listdir(cache)) == 1
  test = ip.load_array_split(folder=folder, split="test", cache_dir=cache)
  assert len(test.labels) == 6 and test.class_names == split.class_names

  def no_decoding(*args, **kwargs):
    raise RuntimeError("decoded again")

  monkeypatch.setattr(tfds, "ImageFolder", no_decoding)
  caplog.set_level(logging.INFO, logger="absl")
  again = ip.load_array_split(folder=folder, split="train", cache_dir=cache)
  assert (f"Read image folder {folder}, split 'train' from its cache {cache}"
          in caplog.text)  # a log shows which file the arrays came from
  np.testing.assert_array_equal(again.images, split.images)
  np.testing.assert_array_equal(again.labels, split.labels)

  _write_image(os.path.join(folder, "train", "ant", "extra.png"), np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(RuntimeError, match="decoded again"):  # the changed folder is re-read
    ip.load_array_split(folder=folder, split="train", cache_dir=cache)
  monkeypatch.undo()
  assert len(ip.load_array_split(folder=folder, split="train", cache_dir=cache).labels) == 13
  # A file moved to another class (relabelled) keeps its size and mtime: still a new listing.
  os.rename(os.path.join(folder, "train", "ant", "extra.png"),
            os.path.join(folder, "train", "bee", "extra.png"))
  relabelled = ip.load_array_split(folder=folder, split="train", cache_dir=cache)
  assert np.bincount(relabelled.labels).tolist() == [4, 5, 4]  # ant, bee, cat

  # A cache file cut short (or empty) is decoded again and rewritten, not a crash.
  for damage in (lambda b: b[: len(b) // 2], lambda b: b""):
    for name in os.listdir(cache):
      path = os.path.join(cache, name)
      with open(path, "rb") as f:
        data = f.read()
      with open(path, "wb") as f:
        f.write(damage(data))
    assert len(ip.load_array_split(folder=folder, split="train", cache_dir=cache).labels) == 13
    assert len(ip.load_array_split(folder=folder, split="test", cache_dir=cache).labels) == 6
  with pytest.raises(ValueError, match="cache directory .* is a file"):
    ip.load_array_split(folder=folder, split="train", cache_dir=os.path.join(folder, "train",
                                                                              "bee", "extra.png"))


def test_a_folder_with_a_long_or_a_non_utf8_name(tmp_path):
  """A long name, whole in the cache's file name, passed the 255-byte limit: never cached. One
  that is not UTF-8 text failed in TensorFlow, or on a bare codec error."""
  folder = _make_folder(tmp_path / ("数据" * 40))  # 240 bytes
  cache = tmp_path / "cache"
  ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  assert len(os.listdir(cache)) == 1
  latin1 = os.fsdecode(bytes(tmp_path) + b"/donn\xe9es")
  os.makedirs(os.path.join(latin1, "train", "ant"))
  with pytest.raises(ValueError, match=r"donn\\udce9es' is not UTF-8 text, which TensorFlow"):
    ip.load_array_split(folder=latin1, split="train", cache_dir=str(cache))


def test_the_default_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
  """Clusters point XDG_CACHE_HOME at scratch space (home quotas are small), and pip and torch
  follow it: the decoded arrays went to ~/.cache all the same."""
  folder = _make_folder(tmp_path / "data", per_split=(("train", 1),))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "scratch"))
  ip.load_array_split(folder=folder, split="train")
  assert len(os.listdir(tmp_path / "scratch" / "sortkd_jax")) == 1
  assert not os.path.exists(tmp_path / "home")
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid by the XDG spec: ignored
  ip.load_array_split(folder=folder, split="train")
  assert len(os.listdir(tmp_path / "home" / ".cache" / "sortkd_jax")) == 1


def test_a_cache_that_cannot_be_written_is_skipped_and_leaves_no_partial_file(
    tmp_path, monkeypatch, caplog):
  """A full disk under the cache stopped training, and each try left a partial file there that
  nothing removed (filling the disk further): now the arrays serve without the cache."""
  folder = _make_folder(tmp_path / "data")
  cache = tmp_path / "cache"

  def disk_full(path, **arrays):
    with open(path, "wb") as f:
      f.write(b"PK" * 1000)  # a part written before the disk filled up
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ip.np, "savez", disk_full)
  caplog.set_level(logging.WARNING, logger="absl")
  split = ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  assert split.images.shape == (12, 32, 32, 3) and split.class_names == ("ant", "bee", "cat")
  assert os.listdir(cache) == []
  assert (f"Cannot cache the decoded image folder {folder}, split 'train' in {cache}"
          in caplog.text)
  assert "(No space left on device); going on without the cache" in caplog.text


def test_the_split_checksum_covers_the_labels():
  """What a resume checks it trains on: relabelled images are other data."""
  images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
  crc = lambda labels: ip.ArraySplit(images, np.array(labels, np.int32), 4).crc32()  # noqa
  assert crc([0, 1, 2, 3]) != crc([1, 0, 2, 3])


def test_partial_cache_files_of_killed_runs_are_removed(tmp_path, monkeypatch):
  """A run killed (SIGTERM, SIGKILL) while it wrote the cache left its partial file, up to the
  cache's size, for good; one interrupted by Ctrl-C too. Partials of live writers stay."""
  import socket
  import time

  folder = _make_folder(tmp_path / "data")
  cache = tmp_path / "cache"
  ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  (cache_name,) = os.listdir(cache)
  os.remove(cache / cache_name)
  ended = subprocess.Popen([sys.executable, "-c", "pass"])
  ended.wait()
  host = socket.gethostname()
  partials = {
      f"{cache_name}.{host}-{ended.pid}.tmp.npz": False,  # its process has ended
      f"{cache_name}.{host}-{os.getppid()}.tmp.npz": True,  # still writing
      f"{cache_name}.elsewhere-{ended.pid}.tmp.npz": True,  # another host's, recent
      f"{cache_name}.elsewhere-1.tmp.npz": False,  # another host's, two days old
      f"other-{cache_name}.{host}-{ended.pid}.tmp.npz": True,  # another cache's
      f"{cache_name}.{host}-4194301.tmp.npz": True,  # another user's writer, alive
  }
  for name in partials:
    (cache / name).write_bytes(b"PK" * 1000)
  two_days_ago = time.time() - 2 * 24 * 3600
  os.utime(cache / f"{cache_name}.elsewhere-1.tmp.npz", (two_days_ago, two_days_ago))
  kill = os.kill

  def kill_refused_for_another_users_process(pid, signal):
    if pid == 4194301:  # as os.kill refuses to signal it (these tests may run as root)
      raise PermissionError(1, "Operation not permitted")
    return kill(pid, signal)

  monkeypatch.setattr(ip.os, "kill", kill_refused_for_another_users_process)
  ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  assert sorted(os.listdir(cache)) == sorted(
      [cache_name] + [name for name, kept in partials.items() if kept])

  def interrupted(path, **arrays):
    with open(path, "wb") as f:
      f.write(b"PK" * 1000)
    raise KeyboardInterrupt

  os.remove(cache / cache_name)
  before = set(os.listdir(cache))
  monkeypatch.setattr(ip.np, "savez", interrupted)
  with pytest.raises(KeyboardInterrupt):
    ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  assert set(os.listdir(cache)) == before


def test_checking_a_folder_leaves_no_directory_open(tmp_path):
  """The check reads the first image only, and left two scandir iterators open: a
  ResourceWarning each in a notebook or under -W default."""
  import gc
  import warnings

  folder = _make_folder(tmp_path / "data")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ResourceWarning)
    sources.check_folder_split(folder, "train")
    gc.collect()
  assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_reading_an_image_folder_leaves_no_temporary_folder(tmp_path, monkeypatch):
  """tfds' builder of an image folder made an empty /tmp/tmp*tfds folder and left it: one a
  run (950 on the machine this was found on). Another program's temporary folders stay."""
  import tempfile

  temp = tmp_path / "tmp"
  (temp / "tmpotherstfds").mkdir(parents=True)  # another program's, made before
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  folder = _make_folder(tmp_path / "data")
  ip.load_array_split(folder=folder, split="train", cache_dir=str(tmp_path / "cache"))
  assert [p.name for p in temp.glob("tmp*tfds")] == ["tmpotherstfds"]
  # One made meanwhile by another user's run stays (root's rmdir would remove it).
  monkeypatch.setattr(sources.os, "getuid", lambda: os.stat(temp).st_uid + 1)
  ip.load_array_split(folder=_make_folder(tmp_path / "data2"), split="train",
                      cache_dir=str(tmp_path / "cache"))
  assert len(list(temp.glob("tmp*tfds"))) == 2


def test_runs_started_together_decode_a_folder_once(tmp_path, monkeypatch, caplog):
  """A sweep's runs, started together on one folder, each decoded it, on the cores they share
  (4 runs: 26 s a split each, against 5.6 s for one): now one decodes and the others wait to
  read its cache."""
  import fcntl
  import threading
  import time

  folder = _make_folder(tmp_path / "data")
  cache = tmp_path / "cache"
  first = ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  (cache_name,) = os.listdir(cache)
  decoded = (cache / cache_name).read_bytes()
  os.remove(cache / cache_name)
  caplog.set_level(logging.INFO, logger="absl")
  caplog.clear()  # of the set-up's decoding, logged where INFO is on already
  outcome = []

  def second_run():
    try:
      outcome.append(ip.load_array_split(folder=folder, split="train", cache_dir=str(cache)))
    except Exception as e:  # noqa: BLE001 (reported below)
      outcome.append(e)

  with open(cache / f"{cache_name}.lock", "a") as first_run:  # decoding it now
    fcntl.flock(first_run, fcntl.LOCK_EX)
    waiting = threading.Thread(target=second_run)
    waiting.start()
    deadline = time.monotonic() + 60
    while "Another process is decoding" not in caplog.text and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not outcome and waiting.is_alive()
    (cache / cache_name).write_bytes(decoded)  # the first run's cache, written before it ends
  waiting.join(60)
  assert (f"Another process is decoding image folder {folder}, split 'train': waiting to read "
          f"its cache {cache / cache_name}." in caplog.text)
  assert "Decoding" not in caplog.text and "split 'train' from its cache" in caplog.text
  np.testing.assert_array_equal(outcome[0].images, first.images)
  assert os.listdir(cache) == [cache_name]  # the lock file goes with its run

  # A decoding process that failed (no cache) removes its lock file as it ends, while one waits
  # on it and a third has locked a new one there: the waiting one must wait for the third.
  os.remove(cache / cache_name)
  outcome.clear()
  checks = []
  same_file = ip._same_file
  monkeypatch.setattr(ip, "_same_file", lambda *a: checks.append(same_file(*a)) or checks[-1])
  deadline = time.monotonic() + 60
  with open(cache / f"{cache_name}.lock", "a") as failing_run:
    fcntl.flock(failing_run, fcntl.LOCK_EX)
    waiting = threading.Thread(target=second_run)
    waiting.start()
    while caplog.text.count("Another process is decoding") < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
    os.remove(cache / f"{cache_name}.lock")
    with open(cache / f"{cache_name}.lock", "a") as third_run:
      fcntl.flock(third_run, fcntl.LOCK_EX)
      failing_run.close()
      while not (checks or outcome) and time.monotonic() < deadline:
        time.sleep(0.05)
      time.sleep(0.2)  # where it would go on to decode
      assert not outcome and waiting.is_alive() and checks[0] is False
      (cache / cache_name).write_bytes(decoded)
  waiting.join(60)
  assert "Decoding" not in caplog.text
  np.testing.assert_array_equal(outcome[0].images, first.images)


def test_an_unreadable_cache_is_decoded_anew_and_said_so(tmp_path, caplog):
  """A cache cut short (a full disk, a copy interrupted) is not an error: the folder is decoded
  again and the cache rewritten."""
  folder = _make_folder(tmp_path / "data")
  cache = tmp_path / "cache"
  first = ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  (cache_name,) = os.listdir(cache)
  (cache / cache_name).write_bytes((cache / cache_name).read_bytes()[:100])
  caplog.set_level(logging.INFO, logger="absl")
  caplog.clear()
  again = ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  assert caplog.text.count(f"Ignoring the unreadable cache {cache / cache_name} (") == 1
  assert "Decoding image folder" in caplog.text
  np.testing.assert_array_equal(again.images, first.images)
  with np.load(cache / cache_name) as rewritten:
    np.testing.assert_array_equal(rewritten["images"], first.images)


def test_a_failed_download_says_what_to_do_offline(tmp_path, monkeypatch, caplog):
  """Where the download host answered and the download failed later (tfds retries for minutes):
  the log says so before, the error after."""
  def offline(builder, download_config):
    raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

  monkeypatch.setattr(sources, "_unreachable_download_host", lambda builder: None)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  caplog.set_level(logging.INFO, logger="absl")
  with pytest.raises(RuntimeError, match=(
      r"Could not download and prepare tfds dataset 'cifar100' under data_dir=.* "
      r"\(ConnectionError: Failed to resolve 'www.cs.toronto.edu'\)\. Offline\? .*"
      r"--config.data.folder=DIR: torchvision's CIFAR folder")):
    ip.load_array_split(name="cifar100", split="test", data_dir=str(tmp_path), download=True)
  assert re.search(r"Preparing tfds dataset 'cifar100' under .* Should its download stall \(tfds "
                   r"retries for minutes\): Ctrl-C, and pass --config.data.folder", caplog.text)


@pytest.mark.parametrize("failure, reason", [
    (socket.gaierror(-2, "Name or service not known"),
     "cannot look up www.cs.toronto.edu ([Errno -2] Name or service not known)"),
    (TimeoutError(), "cannot connect to www.cs.toronto.edu:443 (TimeoutError)"),
    (ConnectionRefusedError(111, "Connection refused"),
     "cannot connect to www.cs.toronto.edu:443 ([Errno 111] Connection refused)"),
])
def test_offline_a_download_fails_in_seconds_not_after_minutes_of_retries(
    tmp_path, monkeypatch, failure, reason):
  """Offline, tfds retried the download for 3.5 minutes before it failed: now its host is tried
  once first, and tfds is not started."""
  tried = []
  def no_network(address, timeout):
    tried.append((address, timeout))
    raise failure
  def prepare(builder, download_config):
    raise AssertionError("tfds started its download")

  for proxy in ("http_proxy", "https_proxy", "all_proxy"):
    for name in (proxy, proxy.upper()):
      monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
  with pytest.raises(RuntimeError, match=(
      r"Cannot download tfds dataset 'cifar100' to prepare it under data_dir=" + re.escape(
          f"{tmp_path}: this machine {reason}. Offline? Prepare it where there is internet "
          "(`tfds build cifar100 --data_dir=DIR`) and pass --config.data.data_dir=DIR, or pass "
          "--config.data.folder=DIR: torchvision's CIFAR folder"))):
    ip.load_array_split(name="cifar100", split="test", data_dir=str(tmp_path), download=True)
  assert tried == [(("www.cs.toronto.edu", 443), 15.0)]

  # Behind a proxy tfds connects through it: nothing is tried here, tfds downloads.
  for proxy in ("https_proxy", "ALL_PROXY"):
    tried.clear()
    with monkeypatch.context() as env:
      env.setenv(proxy, "http://proxy.example:3128")
      with pytest.raises(RuntimeError, match="Could not download and prepare .* tfds started"):
        ip.load_array_split(name="cifar100", split="test", data_dir=str(tmp_path),
                            download=True)
    assert tried == [], proxy

  # tfds.testing.mock_data prepares nothing: it reads without a download.
  with tfds.testing.mock_data(num_examples=3):
    split = ip.load_array_split(name="cifar100", split="test", data_dir=str(tmp_path),
                                download=True)
  assert len(split.labels) == 3 and tried == []


def test_a_reachable_download_host_lets_tfds_download(tmp_path, monkeypatch):
  class Connection:
    def close(self):
      pass
  started = []
  def prepare(builder, download_config):
    started.append(builder.name)
    raise ConnectionError("reset mid-way")

  monkeypatch.setattr(socket, "create_connection", lambda address, timeout: Connection())
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
  with pytest.raises(RuntimeError, match=r"\(ConnectionError: reset mid-way\)"):
    ip.load_array_split(name="cifar100", split="test", data_dir=str(tmp_path), download=True)
  assert started == ["cifar100"]


def test_a_data_dir_this_user_cannot_write_is_not_called_offline(tmp_path, monkeypatch):
  """A lab's shared, read-only data_dir without the dataset was met with "Offline?"."""
  def not_writable(builder, download_config):
    raise PermissionError(13, "Permission denied", str(tmp_path / "cifar100"))

  monkeypatch.setattr(sources, "_unreachable_download_host", lambda builder: None)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", not_writable)
  with pytest.raises(RuntimeError, match=(
      rf"under data_dir={re.escape(str(tmp_path))} \(PermissionError: \[Errno 13\] Permission "
      rf"denied: .*\)\. {re.escape(str(tmp_path))} cannot be written by this user \(a shared "
      r"one\?\): prepare it elsewhere \(`tfds build cifar100 --data_dir=DIR`\) and pass "
      r"--config.data.data_dir=DIR, or ")):
    ip.load_array_split(name="cifar100", split="test", data_dir=str(tmp_path), download=True)


def test_messages_name_the_data_dir_tfds_reads_from_the_environment(tmp_path, monkeypatch,
                                                                     caplog):
  """Clusters set TFDS_DATA_DIR, which tfds reads when no data_dir is given: the messages named
  ~/tensorflow_datasets instead, where nothing was looked for."""
  shared = str(tmp_path / "shared_tfds")
  monkeypatch.setenv("TFDS_DATA_DIR", shared)
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", shared)  # as read at tfds' import
  caplog.set_level(logging.INFO, logger="absl")
  with pytest.raises(FileNotFoundError, match=(
      rf"'cifar100' is not prepared under data_dir={re.escape(shared)}\. Either")):
    ip.load_array_split(name="cifar100", split="test", download=False)

  def offline(builder, download_config):
    raise ConnectionError("no network")
  monkeypatch.setattr(sources, "_unreachable_download_host", lambda builder: None)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  with pytest.raises(RuntimeError, match=rf"under data_dir={re.escape(shared)} \(Connection"):
    ip.load_array_split(name="cifar100", split="test", download=True)
  assert f"Preparing tfds dataset 'cifar100' under {shared} (once)" in caplog.text
  assert "~/tensorflow_datasets" not in caplog.text
  monkeypatch.setattr(sources.jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=rf"not prepared under data_dir={re.escape(shared)}; "):
    ip.load_array_split(name="cifar100", split="test", download=True)


def test_tfds_without_tensorflow_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` fails
  # As on the first call (it is cached).
  monkeypatch.setattr(sources, "tf_and_tfds", sources.tf_and_tfds.__wrapped__)
  with pytest.raises(ImportError, match=r"needs TensorFlow .*`pip install -r requirements.txt`"):
    ip.load_array_split(name="cifar100", split="test")


def test_unknown_tfds_name_suggests_close_ones():
  with pytest.raises(ValueError, match="Unknown tfds dataset 'cifar1000' \\(did you mean cifar100"):
    ip.load_array_split(name="cifar1000", split="train")
  with pytest.raises(ValueError, match="on-device pipeline"):
    sources.split_info(name=sources.SYNTHETIC, split="train")


def test_missing_folder_or_split(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ip.load_array_split(folder=str(tmp_path / "nowhere"), split="train")
  folder = _make_folder(tmp_path / "data", per_split=(("train", 1),))
  with pytest.raises(FileNotFoundError, match=r"splits found: \['train'\]"):
    ip.load_array_split(folder=folder, split="test", cache_dir=str(tmp_path / "cache"))
  for name in ("a", "b"):
    os.makedirs(tmp_path / "empty" / "train" / name)
  with pytest.raises(ValueError, match="has no images"):
    ip.load_array_split(folder=str(tmp_path / "empty"), split="train")


@pytest.mark.parametrize("decoder", ["tensorflow", "pillow"])
def test_upper_case_extensions_are_images(tmp_path, monkeypatch, decoder):
  """Cameras and Windows tools write `.JPG`; tfds.ImageFolder reads them, so they count."""
  if decoder == "pillow":
    monkeypatch.setattr(ip, "_have_tensorflow", lambda: False)
  folder = _make_folder(tmp_path / "data", per_split=(("train", 2),), ext=".JPG")
  split = ip.load_array_split(folder=folder, split="train", cache_dir=str(tmp_path / "cache"))
  assert split.images.shape == (6, 32, 32, 3)
  assert sources.split_info(folder=folder, split="train") == (6, 3)


def test_folder_of_wrong_image_size(tmp_path):
  folder = _make_folder(tmp_path / "data", per_split=(("train", 2),), size=(8, 8))
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match=r"6 of 6 images are not \(32, 32, 3\).*\(8, 8, 3\)"):
    ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  assert not cache.exists() or not os.listdir(cache)


@pytest.mark.parametrize("decoder", ["tensorflow", "pillow"])
def test_folder_with_undecodable_files_names_them(tmp_path, monkeypatch, decoder):
  """TF's decode error names no file: a JPEG cut short or a text file is named, nothing cached."""
  folder = _make_folder(tmp_path / "data", per_split=(("train", 2),), ext=".jpg")
  cut = os.path.join(folder, "train", "bee", "0001.jpg")
  _cut_short(cut)
  with open(os.path.join(folder, "train", "cat", "notes.jpg"), "w") as f:
    f.write("not an image")
  if decoder == "pillow":
    monkeypatch.setattr(ip, "_have_tensorflow", lambda: False)
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match=r"2 of 7 image files cannot be decoded") as err:
    ip.load_array_split(folder=folder, split="train", cache_dir=str(cache))
  assert cut in str(err.value) and os.path.join("cat", "notes.jpg") in str(err.value)
  assert "0000.jpg" not in str(err.value)
  assert not cache.exists() or not os.listdir(cache)


@pytest.mark.parametrize("decoder", ["tensorflow", "pillow"])
def test_files_that_are_not_read_are_named(tmp_path, caplog, monkeypatch, decoder):
  """tfds.ImageFolder reads .jpg/.jpeg/.png only: other images would vanish from the split."""
  if decoder == "pillow":
    monkeypatch.setattr(ip, "_have_tensorflow", lambda: False)
  folder = _make_folder(tmp_path / "data", per_split=(("train", 2), ("test", 1)))
  train = tmp_path / "data" / "train"
  (train / "ant" / "photo.webp").write_bytes(b"RIFF")
  (train / "README.txt").write_text("beside the class folders")
  os.makedirs(train / "bee" / "more")  # torchvision's ImageFolder would read it: not tfds'
  _write_image(str(train / "bee" / "more" / "0.png"), np.zeros((32, 32, 3), np.uint8))
  os.makedirs(train / "dog")  # an empty class, in every split
  os.makedirs(tmp_path / "data" / "test" / "dog")
  caplog.set_level(logging.WARNING, logger="absl")
  assert len(ip.load_array_split(folder=folder, split="train",
                                 cache_dir=str(tmp_path / "c")).labels) == 6
  assert len(ip.load_array_split(folder=folder, split="test",
                                 cache_dir=str(tmp_path / "c")).labels) == 3
  where = f"image folder {folder}, split 'train'"
  warnings = [
      f"Skipping 1 files of {where} that are not .jpg/.jpeg/.png, e.g. {train}/ant/photo.webp.",
      f"Skipping 1 files of {where} that are not in a class folder, e.g. {train}/README.txt.",
      f"Skipping the 1 sub-folders of class folders of {where}, e.g. {train}/bee/more: only the "
      "images directly in a class folder are read (unlike torchvision's ImageFolder); move "
      "their images up to train on them.",
      f"1 of the 4 classes have no images in {where}: dog."]
  for warning in warnings:
    assert caplog.text.count(warning) == 1, warning  # not for 'test'
  assert "classes have no images in image folder" in caplog.text.replace(warnings[-1], "")
  if decoder == "tensorflow":
    caplog.clear()
    sources._scan_folder_split.cache_clear()
    assert sources.split_info(folder=folder, split="train") == (6, 4)  # the streams' listing
    for warning in warnings:
      assert warning in caplog.text


@pytest.mark.parametrize("decoder", ["tensorflow", "pillow"])
def test_a_folder_named_like_an_image_is_refused_before_reading(tmp_path, monkeypatch, decoder):
  if decoder == "pillow":
    monkeypatch.setattr(ip, "_have_tensorflow", lambda: False)
  folder = _make_folder(tmp_path / "data", per_split=(("train", 1), ("test", 1)))
  os.makedirs(tmp_path / "data" / "test" / "cat" / "weird.jpg")
  with pytest.raises(ValueError, match=r"split 'test': 1 folders are named like images, e\.g\. "
                     r".*/test/cat/weird\.jpg; rename or remove them\.$"):
    ip.load_array_split(folder=folder, split="test", cache_dir=str(tmp_path / "c"))
  with pytest.raises(ValueError, match="folders are named like images"):
    sources.split_info(folder=folder, split="test")  # the streams' listing (ImageNet)


def test_a_folder_of_a_single_class_is_warned_of(tmp_path, caplog):
  os.makedirs(tmp_path / "train" / "cat")
  os.makedirs(tmp_path / "test" / "cat")
  for split in ("train", "test"):
    _write_image(str(tmp_path / split / "cat" / "0.png"), np.zeros((32, 32, 3), np.uint8))
  caplog.set_level(logging.WARNING, logger="absl")
  for split in ("train", "test"):
    ip.load_array_split(folder=str(tmp_path), split=split, cache_dir=str(tmp_path / "c"))
  assert caplog.text.count(f"Image folder {tmp_path} has a single class, cat: every prediction "
                           "is right and nothing is learned.") == 1


def test_folder_splits_with_different_classes_are_refused(tmp_path):
  """Labels index the classes of all splits: one missing from a split is never trained/tested."""
  for split, names in (("train", ("ant", "bee")), ("validation", ("ant", "cat"))):
    for name in names:
      os.makedirs(tmp_path / split / name)
      _write_image(str(tmp_path / split / name / "0.png"), np.zeros((32, 32, 3), np.uint8))
  want = r"missing from 'train': \['cat'\]; missing from 'validation': \['bee'\]"
  with pytest.raises(ValueError, match=want):
    ip.load_array_split(folder=str(tmp_path), split="train", cache_dir=str(tmp_path / "c"))
  with pytest.raises(ValueError, match=want):  # ImageNet folders: tfds.ImageFolder's classes
    sources.split_info(folder=str(tmp_path), split="validation")
  os.makedirs(tmp_path / "train" / "cat")  # an empty class folder evens the class lists
  os.makedirs(tmp_path / "validation" / "bee")
  assert sources.split_info(folder=str(tmp_path), split="validation") == (2, 3)
  for split in ("train", "validation"):  # in every split alike, as Jupyter leaves them
    os.makedirs(tmp_path / split / ".ipynb_checkpoints")
  with pytest.raises(ValueError, match=r"hidden folders that would be taken as classes: "
                     r".*/train/\.ipynb_checkpoints, .*/validation/\.ipynb_checkpoints\. Remove"):
    sources.split_info(folder=str(tmp_path), split="validation")


def test_missing_eval_split_suggests_another(tmp_path):
  folder = _make_folder(tmp_path / "data", per_split=(("train", 1), ("test", 1)))
  with pytest.raises(FileNotFoundError, match=r"To evaluate on the 'test' split \(.*/test\) "
                     r"instead, pass --config.data.test_split=test\.$"):
    sources.split_info(folder=folder, split="validation")
  with pytest.raises(FileNotFoundError) as err:
    sources.split_info(folder=folder, split="train_all")
  assert "test_split=test" in str(err.value)
  os.rename(os.path.join(folder, "train"), os.path.join(folder, "other"))
  with pytest.raises(FileNotFoundError) as err:  # no hint for the train split
    sources.split_info(folder=folder, split="train")
  assert "test_split" not in str(err.value)


def test_validate_labels():
  out = ip.validate_labels(np.array([0, 2, 9], np.int64), 10)
  assert out.dtype == np.int32 and out.tolist() == [0, 2, 9]
  with pytest.raises(ValueError, match=r"2 of 4 labels lie outside \[0, 10\).*\[-1, 10\]"):
    ip.validate_labels(np.array([0, -1, 10, 3]), 10)
  with pytest.raises(ValueError, match="integer"):
    ip.validate_labels(np.array([0.0, 1.0]), 10)
  with pytest.raises(ValueError, match="outside"):
    ip.ArraySplit(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 5], np.int32), num_classes=5)


# ----------------------------------------------------------------------------- ImageNet streams


def test_random_resized_crop_window_ranges_and_fallback():
  @tf.function
  def window(height, width, seeds):
    return tf.map_fn(lambda s: tf.stack(imagenet._random_resized_crop_window(height, width, s)),
                     seeds, fn_output_signature=tf.int32)

  seeds = tf.stack([tf.zeros(500, tf.int64), tf.range(500, dtype=tf.int64)], axis=1)
  top, left, h, w = window(100, 80, seeds).numpy().T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 100).all() and (left + w <= 80).all()
  area = h * w / 8000
  assert area.min() > 0.07 and area.max() <= 1 and area.max() > 0.9
  aspect = w / h
  assert aspect.min() > 0.7 and aspect.max() < 1.42
  assert len(set(zip(top, left))) > 100
  # A 10x200 strip: every try is taller than 10, so torchvision's centre fallback applies,
  # w = round(10 * 4/3) = 13 at left = (200 - 13) // 2.
  np.testing.assert_array_equal(window(10, 200, seeds[:20]).numpy(),
                                np.tile([0, 93, 10, 13], (20, 1)))
  # Its tall twin: h = round(10 / (3/4)) = 13 at top = (200 - 13) // 2.
  np.testing.assert_array_equal(window(200, 10, seeds[:20]).numpy(),
                                np.tile([93, 0, 13, 10], (20, 1)))


def _torchvision_crop_params(height: int, width: int, seed) -> list[int]:
  """torchvision's RandomResizedCrop.get_params, transcribed, on the uniform draws the crop
  makes from `seed` (float32, as they are drawn): its ten tries, rounding, bounds and
  centre fallback."""
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  scales = tf.random.stateless_uniform([10], area_seed, 0.08, 1.0).numpy()
  log_ratios = tf.random.stateless_uniform([10], ratio_seed, np.log(3 / 4), np.log(4 / 3)).numpy()
  for scale, log_ratio in zip(scales, log_ratios):
    target_area = np.float32(height * width) * scale
    aspect = np.exp(log_ratio)
    w = int(round(float(np.sqrt(target_area * aspect))))
    h = int(round(float(np.sqrt(target_area / aspect))))
    if 0 < w <= width and 0 < h <= height:
      top = tf.random.stateless_uniform([], top_seed, 0, height - h + 1, dtype=tf.int32)
      left = tf.random.stateless_uniform([], left_seed, 0, width - w + 1, dtype=tf.int32)
      return [int(top), int(left), h, w]
  in_ratio = width / height
  if in_ratio < 3 / 4:
    w, h = width, int(round(width / (3 / 4)))
  elif in_ratio > 4 / 3:
    h, w = height, int(round(height * 4 / 3))
  else:
    w, h = width, height
  return [(height - h) // 2, (width - w) // 2, h, w]


@pytest.mark.parametrize("height,width", [(100, 80), (9, 12), (12, 9), (30, 30)])
def test_random_resized_crop_window_is_torchvisions_on_the_same_draws(height, width):
  """Each window equals torchvision's algorithm on the same uniform draws: small images make
  full-width and full-height crops and fallbacks frequent, so bounds and rounding show."""
  seeds = [tf.constant([7, i], tf.int64) for i in range(150)]
  got = [[int(v) for v in imagenet._random_resized_crop_window(height, width, seed)]
         for seed in seeds]
  assert got == [_torchvision_crop_params(height, width, seed) for seed in seeds]


def test_train_crops_and_flips_differ_per_image_and_flip_half_of_them():
  """One image, many seeds: its crops differ from seed to seed, and about half of them are
  mirrored (a left-to-right ramp then falls from left to right)."""
  ramp = np.repeat(np.tile(np.arange(0, 240, 4, dtype=np.uint8), (48, 1))[..., None], 3, axis=-1)
  encoded = tf.io.encode_png(ramp)
  outs = np.stack([imagenet._train_image(encoded, tf.constant([3, i], tf.int64), 16).numpy()
                   for i in range(200)])
  slope = np.sign(outs[:, :, -1, 0].astype(int) - outs[:, :, 0, 0].astype(int)).mean(axis=1)
  assert set(slope) <= {-1.0, 1.0}
  assert 0.35 < np.mean(slope < 0) < 0.65
  assert len({o.tobytes() for o in outs}) > 150


def test_eval_geometry_is_torchvision_resize_then_centre_crop():
  # Shorter side 300 -> 256, longer int(256 * 400 / 300) = 341; crop top round(32 / 2) = 16,
  # left round(117 / 2) = 58, or for 402 wide (343) round(119 / 2) = 60: round half to even,
  # as Python's round.
  for width, longer, left in ((400, 341, 58), (402, 343, 60)):
    image = np.random.default_rng(0).integers(0, 256, (300, width, 3), np.uint8)
    got = imagenet._eval_image(tf.io.encode_png(image), image_size=224, resize_size=256).numpy()
    resized = tf.image.resize(image, [256, longer], method="bilinear", antialias=True).numpy()
    want = np.clip(np.round(resized[16:240, left:left + 224]), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, want)


def test_jpeg_decoding_equals_pillow(tmp_path):
  """torchvision decodes with PIL; TF's default fast IDCT would be about 1 grey level off."""
  from PIL import Image
  rng = np.random.default_rng(1)
  smooth = np.cumsum(rng.integers(-8, 9, (96, 80, 3)), axis=1) % 256
  Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "a.jpg", quality=85)
  encoded = tf.io.read_file(str(tmp_path / "a.jpg"))
  want = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
  np.testing.assert_array_equal(sources.decode_image(encoded).numpy(), want)
  png = tf.io.encode_png(want)
  np.testing.assert_array_equal(sources.decode_image(png).numpy(), want)


def test_jpeg_crop_window_equals_pillow_decode_then_crop(tmp_path):
  """torchvision decodes the whole JPEG, then crops; decoding only the window would change the
  window's edge pixels of a 4:2:0 file (chroma upsampled without its outside neighbours)."""
  from PIL import Image
  rng = np.random.default_rng(2)
  image = np.cumsum(rng.integers(-40, 41, (75, 90, 3)), axis=0) % 256
  Image.fromarray(image.astype(np.uint8)).save(tmp_path / "a.jpg", quality=90, subsampling=2)
  encoded = tf.io.read_file(str(tmp_path / "a.jpg"))
  whole = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
  windows = [(0, 0, 75, 90), (0, 0, 9, 7), (66, 83, 9, 7)] + [
      (t, l, h, w) for h, w, t, l in (rng.integers([1, 1, 0, 0], [75, 90, 75, 90], 4)
                                      for _ in range(40)) if t + h <= 75 and l + w <= 90]
  for top, left, h, w in windows:
    got = imagenet.decode_jpeg_window(encoded, *map(int, (top, left, h, w)), height=75,
                                      width=90).numpy()
    np.testing.assert_array_equal(got, whole[top:top + h, left:left + w],
                                  err_msg=str((top, left, h, w)))


def test_bilinear_resize_is_within_one_grey_level_of_pillow():
  """PIL's fixed-point two-pass resize vs TF's float one (no antialiasing would be far off)."""
  from PIL import Image
  rng = np.random.default_rng(3)
  image = (np.cumsum(rng.integers(-30, 31, (180, 130, 3)), axis=1) % 256).astype(np.uint8)
  for height, width in ((224, 224), (256, 184), (37, 301), (45, 60)):
    got = imagenet._resize_uint8(image, [height, width]).numpy().astype(int)
    want = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    diff = got - want
    assert np.abs(diff).max() <= 1 and abs(diff.mean()) < 0.05, (height, width)


def test_mock_imagenet_train_and_eval():
  with tfds.testing.mock_data(num_examples=10):
    train = imagenet.imagenet_train_dataset(global_batch_size=4, shuffle_buffer=8)
    for batch in train.take(3).as_numpy_iterator():
      assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.uint8
      assert batch["label"].dtype == np.int32
      assert 0 <= batch["label"].min() <= batch["label"].max() < 1000
    batches = list(imagenet.imagenet_eval_dataset(global_batch_size=4).as_numpy_iterator())
    want = [ex["label"] for ex in tfds.load("imagenet2012", split="validation").as_numpy_iterator()]
    capped = list(imagenet.imagenet_eval_dataset(global_batch_size=4,
                                                 max_examples=5).as_numpy_iterator())
  masks = [b["mask"].tolist() for b in batches]
  assert masks == [[True] * 4, [True] * 4, [True, True, False, False]]
  assert [b["mask"].tolist() for b in capped] == [[True] * 4, [True, False, False, False]]
  assert all(b["image"].shape == (4, 224, 224, 3) for b in batches)
  labels = np.concatenate([b["label"] for b in batches])[:10]
  np.testing.assert_array_equal(labels, want)


def _eval_examples(count, global_batch_size=4, **source):
  """(image numbers each process evaluates, in order; batches per process) with `count`
  processes; an image's number is encoded in its grey level (20 + 30·i)."""
  seen, batch_counts = [], []
  for index in range(count):
    batches = list(imagenet.imagenet_eval_dataset(
        global_batch_size=global_batch_size, image_size=16, resize_size=20, process_index=index,
        process_count=count, **source).as_numpy_iterator())
    batch_counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (global_batch_size // count, 16, 16, 3)
      seen.append([int(np.round((im.mean() - 20) / 30)) for im, m in zip(b["image"], b["mask"])
                   if m])
  return seen, batch_counts


def test_folder_streams_shard_across_processes(tmp_path):
  """7 images of mixed sizes and formats, 2 processes: eval covers each example exactly once,
  and a `max_examples` cap keeps the same first examples for any process count."""
  sizes = [(40, 30), (30, 50), (24, 24), (64, 20), (33, 47), (20, 20), (50, 60)]
  for i, size in enumerate(sizes):
    name = CLASSES[i % 2]
    os.makedirs(tmp_path / "val" / name, exist_ok=True)
    _write_image(str(tmp_path / "val" / name / f"{i}{'.png' if i % 3 else '.jpg'}"),
                 np.full((*size, 3), 20 + 30 * i, np.uint8))
  source = dict(name=None, folder=str(tmp_path), split="val")
  seen, batch_counts = _eval_examples(2, **source)
  assert batch_counts == [2, 2]  # ceil(ceil(7 / 2) / 2) on each process
  assert sorted(sum(seen, [])) == list(range(7))
  common = dict(global_batch_size=4, image_size=16, process_index=1, process_count=2, **source)
  for b in imagenet.imagenet_train_dataset(shuffle_buffer=4, **common).take(4).as_numpy_iterator():
    assert b["image"].shape == (2, 16, 16, 3) and b["label"].dtype == np.int32
  first = sum(_eval_examples(1, max_examples=5, **source)[0], [])
  assert len(first) == 5
  for count in (2, 4):
    assert sorted(sum(_eval_examples(count, max_examples=5, **source)[0], [])) == sorted(first)


def test_each_image_process_and_epoch_draws_its_own_crops_and_flips(tmp_path):
  """With every image the same, batches differ only by their crops and flips: the images of a
  batch from one another, two processes' first batches (drawn from the same seed, they would
  crop alike at each place), and process 1 of seed 0 from process 0 of seed 1."""
  y, x = np.mgrid[:24, :24]
  image = np.repeat((4 * x + 5 * y)[..., None], 3, axis=-1).astype(np.uint8)  # a gradient
  for i in range(8):
    os.makedirs(tmp_path / "train" / CLASSES[i % 2], exist_ok=True)
    _write_image(str(tmp_path / "train" / CLASSES[i % 2] / f"{i}.png"), image)
  first = [next(imagenet.imagenet_train_dataset(
      name=None, folder=str(tmp_path), split="train", global_batch_size=4, image_size=8,
      shuffle_buffer=1, seed=0, process_index=index, process_count=2).as_numpy_iterator())
      for index in (0, 1)]
  assert not np.array_equal(first[0]["image"], first[1]["image"])
  assert not np.array_equal(first[0]["image"][0], first[0]["image"][1])
  next_seed = next(imagenet.imagenet_train_dataset(
      name=None, folder=str(tmp_path), split="train", global_batch_size=4, image_size=8,
      shuffle_buffer=1, seed=1, process_index=0, process_count=2).as_numpy_iterator())
  assert not np.array_equal(first[1]["image"], next_seed["image"])


def test_folder_train_stream_takes_a_new_order_of_all_files_each_epoch(tmp_path):
  """torch's shuffle=True over an ImageFolder: every epoch is a permutation of the whole shard,
  a different one each epoch, the same for the same seed; process shards are disjoint."""
  for i in range(12):
    os.makedirs(tmp_path / "train" / CLASSES[i % 2], exist_ok=True)
    _write_image(str(tmp_path / "train" / CLASSES[i % 2] / f"{i}.png"),
                 np.full((20, 20, 3), 10 + 20 * i, np.uint8))

  def epochs(seed, index, n=3, shuffle_buffer=1):
    """The images of process `index` of 2 in the first n epochs (6 files, 3 batches each)."""
    stream = imagenet.imagenet_train_dataset(
        name=None, folder=str(tmp_path), split="train", global_batch_size=4, image_size=8,
        shuffle_buffer=shuffle_buffer, seed=seed, process_index=index, process_count=2)
    order = [int(np.round((image.mean() - 10) / 20))  # constant images: any crop keeps i
             for b in stream.take(3 * n).as_numpy_iterator() for image in b["image"]]
    return [order[6 * k:6 * (k + 1)] for k in range(n)]

  first, second, third = epochs(0, index=0)
  assert sorted(first) == sorted(second) == sorted(third)
  # No example buffer: it would add nothing to a full permutation but file reads.
  assert epochs(0, index=0, shuffle_buffer=1000) == [first, second, third]
  assert len({tuple(first), tuple(second), tuple(third)}) == 3  # seeded: not a chance result
  assert epochs(0, index=0) == [first, second, third]
  assert sorted(epochs(0, index=1)[0] + first) == list(range(12))
  assert epochs(1, index=0) != [first, second, third]


def test_train_epochs_are_the_seeded_streams_one_after_another_transformed_once(
    tmp_path, monkeypatch):
  """A run's stream equals each epoch's own seeded stream cut to its steps, in order (so a
  resumed run sees the same batches), and traces the image transform once, not per epoch."""
  rng = np.random.default_rng(0)
  for i in range(10):
    os.makedirs(tmp_path / "train" / CLASSES[i % 2], exist_ok=True)
    _write_image(str(tmp_path / "train" / CLASSES[i % 2] / f"{i}.jpg"),
                 rng.integers(0, 256, (20 + i, 30 - i, 3), np.uint8))
  common = dict(name=None, folder=str(tmp_path), split="train", global_batch_size=4,
                image_size=8, process_index=1, process_count=2)
  seeds = [3, 4, 5]
  expected = [b for seed in seeds
              for b in imagenet.imagenet_train_dataset(seed=seed, **common).take(3)
              .as_numpy_iterator()]
  traces = []
  train_image = imagenet._train_image
  monkeypatch.setattr(imagenet, "_train_image",
                      lambda *a, **k: traces.append(1) or train_image(*a, **k))
  stream = imagenet.imagenet_train_epochs(seeds=seeds, steps_per_epoch=3, **common)
  assert len(traces) == 1
  got = list(stream.as_numpy_iterator())
  assert len(got) == len(expected) == 9
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(g["image"], e["image"])
    np.testing.assert_array_equal(g["label"], e["label"])
  assert not np.array_equal(got[0]["image"], got[3]["image"])  # epochs differ
  with pytest.raises(ValueError, match="An endless stream .* takes one seed"):
    imagenet.imagenet_train_epochs(seeds=seeds, steps_per_epoch=None, **common)


def test_a_folder_stream_reads_only_its_process_shard(tmp_path):
  """Each process reads only its own files, eval too: a dangling link in process 1's shard
  fails process 1's streams and not process 0's."""
  folder = _make_folder(tmp_path / "data", per_split=(("val", 2),), ext=".jpg")
  in_order = tfds.ImageFolder(folder).as_dataset(split="val").as_numpy_iterator()
  missing = [ex["image/filename"].decode() for ex in in_order][1]  # process 1's first of 2
  os.remove(missing)
  os.symlink(os.path.join(folder, "nowhere.jpg"), missing)
  common = dict(name=None, folder=folder, split="val", global_batch_size=2, image_size=16)
  streams = lambda index: (  # noqa: E731
      imagenet.imagenet_eval_dataset(resize_size=20, process_index=index, process_count=2,
                                     **common),
      imagenet.imagenet_train_dataset(process_index=index, process_count=2, **common).take(3))
  for stream in streams(0):
    assert len(list(stream.as_numpy_iterator())) == 3
  for stream in streams(1):
    with pytest.raises(tf.errors.NotFoundError):
      list(stream.as_numpy_iterator())


def test_tfds_train_streams_read_their_files_in_a_seeded_order_eval_streams_in_order(
    tmp_path, monkeypatch):
  """tfds' record files are shuffled per epoch seed (then the example buffer), as torch's
  shuffle=True; evaluation reads them in their order."""
  SortkdTinyNumbered(data_dir=str(tmp_path)).download_and_prepare()
  reads = []
  as_dataset = sources._tfds_as_dataset
  monkeypatch.setattr(sources, "_tfds_as_dataset",
                      lambda *args, **kwargs: reads.append(kwargs) or as_dataset(*args, **kwargs))
  source = dict(name="sortkd_tiny_numbered", data_dir=str(tmp_path), split="validation",
                global_batch_size=2, image_size=16)
  imagenet.imagenet_train_epochs(seeds=[3, 4], steps_per_epoch=1, shuffle_buffer=4,
                                 process_index=1, process_count=2, **source)
  shard_reads = [r for r in reads if r["split"] != "validation"]  # this process's sub-split
  assert [(r["shuffle_files"], r["read_config"].shuffle_seed) for r in shard_reads] == [
      (True, 3 * 2 + 1), (True, 4 * 2 + 1)]
  reads.clear()
  imagenet.imagenet_eval_dataset(process_index=1, process_count=2, **source)
  assert reads and not any(r.get("shuffle_files") for r in reads)


def test_an_image_folder_is_listed_once_while_unchanged(tmp_path, monkeypatch, caplog):
  """Listing ImageNet takes seconds and a run opens its folder twice an epoch: one scan, until
  a file is added, and logged."""
  caplog.set_level(logging.INFO, logger="absl")
  folder = _make_folder(tmp_path / "data", per_split=(("train", 2), ("val", 1)))
  scans, split_scans = [], []
  image_folder = tfds.ImageFolder
  monkeypatch.setattr(tfds, "ImageFolder", lambda root: scans.append(root) or image_folder(root))
  check_split_files = sources.check_split_files
  monkeypatch.setattr(sources, "check_split_files",
                      lambda folder, split: split_scans.append(split)
                      or check_split_files(folder, split))
  common = dict(name=None, folder=folder, global_batch_size=2, image_size=16)
  for _ in range(2):
    imagenet.imagenet_train_dataset(split="train", **common)
    imagenet.imagenet_eval_dataset(split="val", resize_size=20, **common)
    assert sources.split_info(name=None, folder=folder, split="train") == (6, 3)
  assert scans == [folder]
  assert split_scans == ["train", "val"]  # once per split, though they alternate
  assert f"Image folder {folder}: train 6 files, val 3 files in" in caplog.text
  _write_image(os.path.join(folder, "train", "bee", "new.png"), np.zeros((32, 32, 3), np.uint8))
  assert sources.split_info(name=None, folder=folder, split="train") == (7, 3)
  assert len(scans) == 2


class SortkdTinyNumbered(tfds.core.GeneratorBasedBuilder):
  """A real prepared tfds dataset (mock_data ignores sub-splits): image i has grey level
  20 + 30·i, and a file name as imagenet2012's."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=2),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples(7)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((20, 24, 3), 20 + 30 * i, np.uint8), "label": i % 2,
                "file_name": f"{i}.JPEG"}


def test_tfds_streams_shard_across_processes(tmp_path):
  """tfds' per-process sub-splits: every example once, the same capped ones for any count."""
  SortkdTinyNumbered(data_dir=str(tmp_path)).download_and_prepare()
  source = dict(name="sortkd_tiny_numbered", data_dir=str(tmp_path), split="validation")
  first = sum(_eval_examples(1, max_examples=5, **source)[0], [])
  assert len(first) == 5
  for count in (2, 4):
    seen, batch_counts = _eval_examples(count, **source)
    assert sorted(sum(seen, [])) == list(range(7)) and len(set(batch_counts)) == 1
    assert sorted(sum(_eval_examples(count, max_examples=5, **source)[0], [])) == sorted(first)
  with pytest.raises(ValueError, match="has 7 examples, fewer than the 8 processes"):
    imagenet.imagenet_train_dataset(global_batch_size=8, process_index=7, process_count=8, **source)


def test_folder_streams_name_undecodable_files(tmp_path, caplog):
  """TF's decode error in a stream names no file: the ValueError names them, and the split."""
  folder = _make_folder(tmp_path / "data", per_split=(("train", 2), ("val", 2)), ext=".jpg")
  cut = os.path.join(folder, "val", "bee", "0001.jpg")
  _cut_short(cut)
  with open(os.path.join(folder, "val", "cat", "notes.jpg"), "w") as f:
    f.write("not an image")
  common = dict(name=None, folder=folder, global_batch_size=2, image_size=16)
  train = imagenet.imagenet_train_dataset(split="train", shuffle_buffer=4, **common).take(4)
  sound = imagenet.naming_undecodable(train.as_numpy_iterator(), split="train", name=None,
                                      folder=folder)
  assert len(list(sound)) == 4  # a sound split streams as before
  caplog.set_level(logging.INFO, logger="absl")
  for stream in (imagenet.imagenet_train_dataset(split="val", shuffle_buffer=4, **common),
                 imagenet.imagenet_eval_dataset(split="val", resize_size=20, **common)):
    with pytest.raises(ValueError, match=r"split 'val': 2 of 7 image files cannot be decoded"
                       ) as err:
      list(imagenet.naming_undecodable(stream.as_numpy_iterator(), split="val", name=None,
                                       folder=folder))
    assert cut in str(err.value) and os.path.join("cat", "notes.jpg") in str(err.value)
    assert "0000.jpg" not in str(err.value)
  assert "decoding its 7 images again" in caplog.text


def test_a_capped_stream_rechecks_only_its_own_examples(tmp_path):
  """With max_examples, the re-check decodes what was streamed, not the whole split."""
  folder = _make_folder(tmp_path / "data", per_split=(("val", 1),), ext=".jpg")  # 3 sound
  for i in range(4):
    with open(os.path.join(folder, "val", "cat", f"notes{i}.jpg"), "w") as f:
      f.write("not an image")
  source = dict(name=None, folder=folder, split="val", max_examples=5)
  stream = imagenet.imagenet_eval_dataset(global_batch_size=2, image_size=16, resize_size=20,
                                          **source)
  with pytest.raises(ValueError, match=r"split 'val': [2-4] of 5 image files cannot be decoded"):
    list(imagenet.naming_undecodable(stream.as_numpy_iterator(), **source))


def test_tfds_streams_name_undecodable_records():
  """A prepared tfds dataset names its records by their 'file_name' feature (imagenet2012)."""
  jpeg = tf.io.encode_jpeg(np.zeros((20, 24, 3), np.uint8)).numpy()
  records = {"image": [jpeg, jpeg[: len(jpeg) // 2], jpeg, b"not an image"],
             "label": np.arange(4, dtype=np.int64),
             "file_name": [f"n0144076{i}_{i}.JPEG" for i in range(4)]}
  as_dataset = lambda *args, **kwargs: tf.data.Dataset.from_tensor_slices(records)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    for split, stream in (
        ("train", imagenet.imagenet_train_dataset(global_batch_size=2, image_size=16,
                                                  shuffle_buffer=4)),
        ("validation", imagenet.imagenet_eval_dataset(global_batch_size=2, image_size=16))):
      with pytest.raises(ValueError, match=f"tfds dataset 'imagenet2012', split '{split}': 2 of 4 "
                         "image files .*: n01440761_1.JPEG, n01440763_3.JPEG. Fix them") as err:
        list(imagenet.naming_undecodable(stream.as_numpy_iterator(), split=split))
      assert "n01440760_0" not in str(err.value)


def test_prefetch_to_device_on_four_devices():
  script = textwrap.dedent("""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from sortkd_jax.distributed import prefetch_to_device
      assert jax.device_count() == 4
      sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
      pulled = []
      def batches():
          for i in range(5):
              pulled.append(i)
              yield {"image": np.full((8, 2, 2, 3), i, np.uint8),
                     "label": np.arange(8, dtype=np.int32) + i}
      it = prefetch_to_device(batches(), 2, sharding)
      first = next(it)
      assert len(pulled) == 2, pulled
      out = [first, *it]
      assert len(out) == 5
      for i, b in enumerate(out):
          assert isinstance(b["image"], jax.Array) and b["image"].sharding == sharding
          assert len(b["label"].addressable_shards) == 4
          np.testing.assert_array_equal(b["label"], np.arange(8) + i)
          assert (np.asarray(b["image"]) == i).all()
      print("ok")
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  root = os.path.dirname(os.path.dirname(os.path.abspath(ip.__file__)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("decoder", ["tensorflow", "pillow"])
def test_decoding_a_folder_logs_its_progress(tmp_path, monkeypatch, caplog, decoder):
  """A folder's first decode takes minutes (60,000 CIFAR JPEGs): it logs how far it got."""
  folder = _make_folder(tmp_path / "data")
  # A line after every image or chunk, instead of every 15 s.
  monkeypatch.setattr(sources, "with_progress",
                      functools.partial(sources.with_progress, every_s=0.0))
  if decoder == "pillow":
    monkeypatch.setattr(ip, "_have_tensorflow", lambda: False)
  caplog.set_level(logging.INFO, logger="absl")
  ip.load_array_split(folder=folder, split="train", cache_dir=str(tmp_path / "cache"))
  progress = [r.getMessage() for r in caplog.records if "images decoded" in r.getMessage()]
  assert progress, caplog.text
  assert re.search(r"split 'train': 12 of 12 images decoded \(\d+/s\)\.$", progress[-1])


def test_image_folder_without_tensorflow_decodes_with_pillow(tmp_path, monkeypatch):
  """GPU machines may lack TensorFlow: the folder is then read with Pillow, to the same arrays in
  the same order (so a max_*_examples limit keeps the same images, and a resume on the other
  machine gets the same batches)."""
  folder = _make_folder(tmp_path / "data")
  for split in ("train", "test"):  # "bee-x/..." sorts before "bee/..." as a path, not as a class
    os.makedirs(os.path.join(folder, split, "bee-x"))
    for i in range(3):
      _write_image(os.path.join(folder, split, "bee-x", f"{i:04d}.png"),
                   np.full((32, 32, 3), 250 - i, np.uint8))
  # 16-bit PNGs: Pillow's convert("RGB") clips a greyscale one (mode I;16) to white.
  for channels in (1, 3):
    values = np.arange(32 * 32 * channels, dtype=np.uint16).reshape(32, 32, channels) * 61
    tf.io.write_file(os.path.join(folder, "train", "ant", f"deep{channels}.png"),
                     tf.io.encode_png(values))
  with_tf = ip.load_array_split(folder=folder, split="train", cache_dir=str(tmp_path / "c1"))
  monkeypatch.setattr(ip, "_have_tensorflow", lambda: False)
  monkeypatch.setattr(tfds, "ImageFolder", None)  # any use of tfds would fail
  with_pil = ip.load_array_split(folder=folder, split="train", cache_dir=str(tmp_path / "c2"))
  assert with_pil.class_names == with_tf.class_names == ("ant", "bee", "bee-x", "cat")
  np.testing.assert_array_equal(with_pil.images, with_tf.images)
  np.testing.assert_array_equal(with_pil.labels, with_tf.labels)
  assert len(set(with_pil.labels[:4].tolist())) > 1  # shuffled: a truncated split mixes classes
  # Each decoder keeps its own cache: the other's is neither reused nor overwritten.
  again = ip.load_array_split(folder=folder, split="train", cache_dir=str(tmp_path / "c1"))
  np.testing.assert_array_equal(again.images, with_pil.images)
  assert len(os.listdir(tmp_path / "c1")) == 2
  _write_image(os.path.join(folder, "train", "ant", "big.png"), np.zeros((40, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"big.png \(40, 32, 3\)"):
    ip.load_array_split(folder=folder, split="train", cache_dir=str(tmp_path / "c3"))


def test_tfds_stream_caps_and_corrupt_record_files(tmp_path):
  """A cap above the split's size or on a sliced split keeps what exists; a corrupt record
  file (not an image) raises TF's error at once, without the image re-check (which would spin
  on a reader that cannot move past the record)."""
  SortkdTinyNumbered(data_dir=str(tmp_path)).download_and_prepare()
  source = dict(name="sortkd_tiny_numbered", data_dir=str(tmp_path))
  assert sorted(sum(_eval_examples(2, max_examples=100, split="validation", **source)[0], [])
                ) == list(range(7))
  sliced = _eval_examples(2, max_examples=3, split="validation[:6]", **source)[0]
  assert len(sum(sliced, [])) == 3
  [record_file] = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files
                   if ".tfrecord" in f]
  with open(record_file, "r+b") as f:
    f.seek(os.path.getsize(record_file) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  stream = imagenet.imagenet_eval_dataset(global_batch_size=2, image_size=16, split="validation",
                                          **source)
  with pytest.raises(tf.errors.DataLossError, match="corrupted record"):
    list(imagenet.naming_undecodable(stream.as_numpy_iterator(), split="validation", **source))


def test_multi_process_runs_do_not_prepare_tfds_datasets(tmp_path, monkeypatch):
  """Every process would write the same files at once: preparing is refused, with the command
  that prepares it once; a single process prepares it."""
  import jax
  source = dict(name="sortkd_tiny_numbered", data_dir=str(tmp_path), split="validation",
                manual_dir=str(tmp_path / "tars"))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"prepare it once before a multi-process run: `tfds "
                     r"build sortkd_tiny_numbered --data_dir=DIR --manual_dir=.*tars`"):
    sources.split_info(**source)
  assert not os.path.exists(tmp_path / "sortkd_tiny_numbered")
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  assert sources.split_info(**source) == (7, 2)


def test_synthetic_data_on_a_tf_data_recipe_says_what_to_use_instead():
  """It said only what synthetic data is not for."""
  with pytest.raises(ValueError, match=r"not for tf.data streams \(ImageNet\): use a "
                     r"configs/cifar_\*.py recipe, or give an image folder, "
                     r"--config.data.folder=DIR \(scripts/benchmark.py times"):
    sources.open_split(name="synthetic", folder=None, split="train", data_dir=None,
                       download=False)


def test_synthetic_test_images_are_not_the_train_images():
  """Each synthetic split has a seed of its own: a test split repeating the train split's first
  images would score training images as test ones."""
  train, test = ip.synthetic_split("train"), ip.synthetic_split("test")
  assert (train.images.shape, test.images.shape) == ((50_000, 32, 32, 3), (10_000, 32, 32, 3))
  assert not np.array_equal(train.images[:100], test.images[:100])
