"""The README's code for users' own training loops runs as written, and does what it says; the
commands, recipes, config fields and model names it and the scripts' and recipes' docstrings
give exist."""

import ast
import glob
import importlib
import os
import re

import jax
import numpy as np
from flax import nnx

from helpers import REPO, SCRIPTS, check_script_command, has_config_field, script_commands
from sortkd_jax import losses, models, sort_teacher_logits

SECTION = "## Sort and the losses in your own training loop"


def _readme() -> str:
  with open(os.path.join(REPO, "README.md")) as f:
    return f.read()


def _readme_block(section: str) -> str:
  text = _readme()
  after = text[text.index(section):]
  return re.search(r"```python\n(.*?)```", after, re.S)[1]


def test_own_training_loop_snippet():
  code = _readme_block(SECTION)
  assert "sort_teacher_logits" in code and "losses.kd" in code
  # Run it up to its step, then check that step against the same loss computed by hand.
  before, step_line = code.rsplit("\n", 2)[0], code.rsplit("\n", 2)[1]
  assert step_line.startswith("loss = train_step(")
  namespace = {}
  exec(compile(before, "README.md", "exec"), namespace)
  student, teacher = namespace["student"], namespace["teacher"]
  images, labels = namespace["images"], namespace["labels"]
  fresh = nnx.clone(student)

  def stats(model):
    return jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  student_stats, teacher_stats = stats(student), stats(teacher)
  logits = fresh(images)
  targets = sort_teacher_logits(nnx.clone(teacher)(images), labels)
  expected = 0.1 * losses.cross_entropy(logits, labels) + 0.9 * losses.kd(logits, targets, 4.0)

  exec(compile(step_line, "README.md", "exec"), namespace)
  np.testing.assert_allclose(namespace["loss"], expected, rtol=1e-5)
  # The student learned and its BatchNorm statistics moved; the frozen teacher's did not.
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         nnx.state(student, nnx.Param), nnx.state(fresh, nnx.Param))
  assert all(jax.tree.leaves(changed))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), stats(student), student_stats)
  assert all(jax.tree.leaves(moved))
  jax.tree.map(np.testing.assert_array_equal, stats(teacher), teacher_stats)


def _recipe_names() -> list[str]:
  """The module names of configs/'s recipe files."""
  names = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(REPO, "configs",
                                                                              "*.py")))
  names = [name for name in names if name not in ("__init__", "common")]
  assert len(names) >= 9, names
  return names


def _every_recipe() -> list:
  """Each recipe file's config for its default pair."""
  return [importlib.import_module(f"configs.{name}").get_config() for name in _recipe_names()]


def test_documented_commands_pass_flags_recipes_and_fields_that_exist():
  """A flag, recipe, pair or config field renamed in the code and not in the README would leave
  users a command that fails as written."""
  commands = script_commands(_readme())
  assert {name for name, _ in commands} == {"train", "eval", "benchmark", "port_weights",
                                            "export_weights"}
  assert sum(bool(args.strip()) for _, args in commands) >= 30
  recipes = _every_recipe()
  for name, args in commands:
    check_script_command(name, args, recipes)
    for arch in re.findall(r"--(?:arch[ =]|config\.(?:student|teacher)\.name=)([\w-]+)", args):
      if not arch.isupper():  # a placeholder: NAME
        models.check_name(arch)


def test_docstring_commands_of_scripts_and_recipes_exist():
  """Each script's docstring shows how to run it, and each recipe's how to launch it."""
  assert sorted(SCRIPTS) == sorted(os.path.basename(path)[:-3] for path in glob.glob(
      os.path.join(REPO, "scripts", "*.py")))  # the scripts script_commands finds
  recipes = _every_recipe()
  for folder, names in (("scripts", SCRIPTS), ("configs", _recipe_names())):
    for name in names:
      with open(os.path.join(REPO, folder, f"{name}.py")) as f:
        commands = script_commands(ast.get_docstring(ast.parse(f.read())) or "")
      assert (name if folder == "scripts" else "train") in {script for script, _ in commands}
      for script, args in commands:
        check_script_command(script, args, recipes)
        if folder == "configs" and script == "train":
          assert f"--config configs/{name}.py:" in args, (name, args)


def test_documented_recipes_and_config_fields_exist():
  """Every `configs/FILE.py:PAIR` and `config.FIELD` the README's prose names exists."""
  text = _readme()
  for module, pair in re.findall(r"configs/(\w+)\.py:(\w+)", text):
    importlib.import_module(f"configs.{module}").get_config(pair)  # an unknown pair raises
  recipes = _every_recipe()
  fields = set(re.findall(r"config\.((?:[a-z0-9_-]+\.)*[a-z0-9_-]+)", text)) - {"json", "yaml"}
  assert len(fields) >= 25, fields
  for field in fields:
    assert any(has_config_field(recipe, field) for recipe in recipes), field


def test_documented_paths_exist():
  """Every file or folder of this repository the README names (`configs/imagenet_{kd,dkd}.py`
  standing for both) exists; mdistiller's own paths, its YAML configs, are not ours."""
  named = set()
  for path in re.findall(r"(?<![\w/.~-])((?:sortkd_jax|configs|scripts|tests|docs|benchmarks|"
                         r"\.ci)/[\w./{},-]*\w}?[\w.]*)", _readme()):
    braces = re.search(r"{([\w,]+)}", path)
    named |= ({path.replace(braces[0], part) for part in braces[1].split(",")} if braces
              else {path})
  named = {path for path in named if not path.endswith(".yaml")}
  assert len(named) >= 40 and "configs/imagenet_lskd.py" in named, sorted(named)
  assert [path for path in sorted(named) if not os.path.exists(os.path.join(REPO, path))] == []
