"""Helpers shared by the test modules: `from helpers import REPO, read_metrics, run_script`.

tests/ is on sys.path through pyproject.toml's `[tool.pytest.ini_options] pythonpath`.
"""

import glob
import importlib
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*args, cwd=REPO, env=None, timeout=300) -> subprocess.CompletedProcess:
  """`python ARGS` on CPU (JAX_PLATFORMS=cpu, plus `env`) from `cwd`, capturing text output."""
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                        cwd=cwd, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def run_script(script, *args, cwd=REPO, env=None, timeout=300) -> subprocess.CompletedProcess:
  """scripts/SCRIPT ARGS, as `run_python` runs it (from the repository root by default)."""
  return run_python(os.path.join(REPO, "scripts", script), *args, cwd=cwd, env=env,
                    timeout=timeout)


SCRIPTS = ("train", "eval", "benchmark", "port_weights", "export_weights")


def script_commands(text: str) -> list[tuple[str, str]]:
  """(script, arguments) of each command of this project's scripts in a shell script or
  Markdown `text`, its `NAME=value` variables substituted: continued lines and code spans that
  wrap joined, comment lines and fenced code skipped, a code span's command ending with it."""
  text = text.replace("\\\n", " ")
  text = re.sub(r"```.*?```", "", text, flags=re.S)  # Markdown's fenced code: no commands
  text = re.sub(r"`[^`]+`", lambda m: m[0] if "\n\n" in m[0] else m[0].replace("\n", " "), text)
  variables = dict(re.findall(r'^\s*(\w+)="?([^"\n]*)"?$', text, re.M))
  commands = []
  for line in text.splitlines():
    if line.lstrip().startswith("#"):
      continue
    while line != (line := re.sub(r"\$(\w+)", lambda m: variables.get(m[1], m[0]), line)):
      pass  # a variable may hold another ($BENCH holds $CFG)
    commands += re.findall(rf"(?:^|(?<=[\s`(]))(?:scripts/)?({'|'.join(SCRIPTS)})\.py"
                           r"(?=[\s`]|$)([^`\n]*)", line)
  return commands


def check_script_command(script: str, args: str, recipes: list) -> None:
  """Asserts that `python scripts/SCRIPT.py ARGS`, as a document or script writes it, passes
  only flags the script defines (in either spelling, as the scripts take them), a `--config
  configs/FILE.py[:PAIR]` that exists, and `--config.FIELD`s of that recipe (of one of
  `recipes` where the command names none: its own default or a placeholder)."""
  with open(os.path.join(REPO, "scripts", f"{script}.py")) as f:
    source = f.read()
  defined = set(re.findall(r'DEFINE_\w+\("([\w-]+)"', source)) | {"help", "helpfull"}
  defined |= {f"no{flag}" for flag in re.findall(r'DEFINE_bool(?:ean)?\("([\w-]+)"', source)}
  if "define_config_flag(" in source:
    defined.add("config")
  named = re.search(r"--config[ =]configs/(\w+)\.py(?::(\S+))?", args)
  if named:  # an unknown pair raises, naming the known ones
    recipes = [importlib.import_module(f"configs.{named[1]}").get_config(named[2])]
  for flag in re.findall(r"""(?:^|[\s"'\[])--([\w.-]+)""", args):
    if flag.startswith("config."):
      assert "config" in defined, (script, args)
      if flag[len("config."):].isupper():  # a placeholder: --config.FIELD=VALUE
        continue
      assert any(has_config_field(recipe, flag[len("config."):]) for recipe in recipes), (
          script, args, flag)
    else:
      assert flag.replace("_", "-") in {d.replace("_", "-") for d in defined}, (script, flag)


def has_config_field(recipe, field: str) -> bool:
  """Whether `A.B` (dashes for underscores allowed, as on the command line) is a field of the
  config `recipe`."""
  group = recipe
  for key in field.replace("-", "_").split("."):
    if not hasattr(group, "keys") or key not in group:
      return False
    group = group[key]
  return True


def corrupt_arrays(epoch_dir) -> None:
  """Overwrites the array files of a training checkpoint's epoch folder: a damaged epoch."""
  for path in glob.glob(os.path.join(epoch_dir, "state", "**", "d", "*"), recursive=True):
    with open(path, "wb") as f:
      f.write(b"not an array" * 8)


def read_metrics(workdir) -> list[dict]:
  """The records of a training run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def python2_pickle(obj) -> bytes:
  """`obj` as Python 2's cPickle (protocol 2) wrote CIFAR's files: dicts, lists, ints, str as
  byte strings, and 2-D uint8 NumPy arrays as NumPy 1 pickled them (numpy.core.multiarray; a
  Fortran-ordered array as its Fortran-order bytes)."""
  import struct

  import numpy as np

  def string(s):
    b = s if isinstance(s, bytes) else s.encode("latin1")
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

  def integer(n):
    return b"J" + struct.pack("<i", n)

  def dump(o):
    if isinstance(o, dict):
      return b"}(" + b"".join(dump(k) + dump(v) for k, v in o.items()) + b"u"
    if isinstance(o, list):
      return b"](" + b"".join(map(dump, o)) + b"e"
    if isinstance(o, (str, bytes)):
      return string(o)
    if isinstance(o, np.ndarray):
      assert o.dtype == np.uint8 and o.ndim == 2
      fortran = o.flags.f_contiguous and not o.flags.c_contiguous
      return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85"
              + string("b") + b"\x87R(" + integer(1) + integer(o.shape[0]) + integer(o.shape[1])
              + b"\x86cnumpy\ndtype\n" + string("u1") + integer(0) + integer(1) + b"\x87R("
              + integer(3) + string("|") + b"NNN" + integer(-1) + integer(-1) + integer(0)
              + b"tb" + (b"\x88" if fortran else b"\x89")
              + string(o.tobytes(order="F" if fortran else "C")) + b"tb")
    return integer(int(o))

  return b"\x80\x02" + dump(obj) + b"."


def write_torchvision_cifar(root, images_by_split, labels_by_split, class_names,
                            variant="cifar-100-python") -> str:
  """A torchvision CIFAR folder `root/variant` of these uint8 [N, 32, 32, 3] images: CIFAR-100's
  `train`/`test`/`meta`, or CIFAR-10's five train batches (the train images split evenly),
  `test_batch` and `batches.meta`."""
  import numpy as np

  folder = os.path.join(root, variant)
  os.makedirs(folder)
  cifar100 = variant == "cifar-100-python"
  files = {"train": ["train"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)],
           "test": ["test"] if cifar100 else ["test_batch"]}
  for split, names in files.items():
    rows = images_by_split[split].transpose(0, 3, 1, 2).reshape(len(images_by_split[split]), -1)
    for name, part, labels in zip(names, np.array_split(rows, len(names)),
                                  np.array_split(labels_by_split[split], len(names))):
      content = {"batch_label": name, "data": part,
                 "fine_labels" if cifar100 else "labels": [int(x) for x in labels]}
      with open(os.path.join(folder, name), "wb") as f:
        f.write(python2_pickle(content))
  meta = ({"fine_label_names": list(class_names)} if cifar100 else
          {"label_names": list(class_names), "num_cases_per_batch": 10000})
  with open(os.path.join(folder, "meta" if cifar100 else "batches.meta"), "wb") as f:
    f.write(python2_pickle(meta))
  return folder
