"""The package's metadata promises what its dependencies allow."""

import importlib.metadata
import os
import re
import tomllib

from helpers import REPO


def _lowest_python(specifier: str) -> tuple[int, ...]:
  """(3, 11) for '>=3.11' (the form these packages use)."""
  match = re.fullmatch(r">=\s*(\d+(?:\.\d+)*)", specifier.strip())
  assert match, f"unexpected Requires-Python {specifier!r}"
  return tuple(int(part) for part in match[1].split("."))


def test_requires_python_is_no_older_than_the_dependencies_need():
  """A Python the installed dependencies refuse is refused by name, not by a resolver failure
  about jax (pyproject said >=3.10, while jax 0.10, flax 0.12.8 and orbax 0.12.8 need 3.11).
  Only the versions requirements.txt pins count: those are installed on every Python, while an
  unpinned numpy is the newest each Python takes (2.5 needs 3.12; on 3.11 pip takes 2.4)."""
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  with open(os.path.join(REPO, "requirements.txt")) as f:
    pinned = set(re.findall(r"^([A-Za-z0-9_.-]+)==", f.read(), re.MULTILINE))
  ours = _lowest_python(project["requires-python"])
  needs = {}
  for requirement in project["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0]
    if name in pinned:
      needs[name] = importlib.metadata.metadata(name).get("Requires-Python")
  assert {"jax", "flax", "orbax-checkpoint"} <= needs.keys()
  assert {name: need for name, need in needs.items()
          if need is not None and _lowest_python(need) > ours} == {}
