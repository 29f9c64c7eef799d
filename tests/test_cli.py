"""What every script shares: known errors as one line, Ctrl-C without a traceback."""

import logging as std_logging
import shlex
import signal
import sys

import pytest
from absl import flags, logging

from helpers import run_python, run_script
from sortkd_jax import cli


def _run(monkeypatch, main, **kwargs):
  """cli.run(main)'s exit status; os._exit (Ctrl-C) is caught as ("os._exit", status). What
  cli.run sets for the whole process, as a script's start does, is undone: absl's INFO level,
  left on, put another test's set-up lines in its caplog."""
  def exit_now(code):  # os._exit would end pytest too
    raise SystemExit(("os._exit", code))

  monkeypatch.setattr(sys, "argv", ["script"])
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # cli.run filters it
  monkeypatch.setattr(cli.os, "_exit", exit_now)
  sigint = signal.getsignal(signal.SIGINT)  # cli.run installs its own
  verbosity = logging.get_verbosity()
  log_filters = [(log, list(log.filters)) for log in (
      logging.get_absl_handler(), std_logging.getLogger("asyncio"))]
  try:
    with pytest.raises(SystemExit) as exit_info:
      cli.run(main, **kwargs)
  finally:
    signal.signal(signal.SIGINT, sigint)
    logging.set_verbosity(verbosity)
    for log, filters in log_filters:
      log.filters[:] = filters
  return exit_info.value.code


def test_an_error_that_leaves_threads_waiting_exits_at_once(monkeypatch, capsys):
  """When orbax failed to make a folder of a save, its other threads waited 5 minutes for it:
  the error was printed, then the interpreter's exit waited for them. Threads that were alive
  before the work began are not its own, and do not count."""
  import threading
  release = threading.Event()
  before = threading.Thread(target=release.wait, args=(60,))
  before.start()

  def main():
    threading.Thread(target=release.wait, args=(60,), name="waiting_for_a_folder").start()
    raise OSError("Saving epoch 2 failed")

  try:
    assert _run(monkeypatch, lambda: (_ for _ in ()).throw(OSError("bad"))) == "error: bad"
    assert _run(monkeypatch, main) == ("os._exit", 1)
  finally:
    release.set()
  assert capsys.readouterr().err.endswith("error: Saving epoch 2 failed\n")


def test_unawaited_failed_checkpoint_reads_and_writes_are_not_reported():
  """After an unreadable checkpoint's one-line error, a TensorStore read that failed too and
  was never awaited printed asyncio's 'Task exception was never retrieved' traceback (seen
  once, on a loaded machine); after a failed save, its other failed writes, gathered, printed
  '_GatheringFuture exception was never retrieved' (a full disk). A best epoch a live run deleted
  while eval.py read it printed a read's future and another's coroutine, with 60 lines of
  TensorStore spec each. Other unawaited failures are still reported."""
  script = (
      "import asyncio, gc\n"
      "from sortkd_jax import cli\n"
      "cli.quiet_unawaited_checkpoint_io()\n"
      "async def fail(message):\n"
      "  raise ValueError(message)\n"
      "async def gather(message):\n"
      "  return asyncio.gather(fail(message))\n"
      "loop = asyncio.new_event_loop()\n"
      "for message in ('OUT_OF_RANGE: Error reading [tensorstore_spec=\\'{}\\']', 'a bug'):\n"
      "  task = loop.create_task(fail(message))\n"
      "  loop.run_until_complete(asyncio.sleep(0.01))\n"
      "  del task\n"
      "  gc.collect()\n"
      "for message in ('RESOURCE_EXHAUSTED: Error writing \"w/0\" in OCDBT database', 'a bug 2',\n"
      "                'Encountered error while reading array index: (slice(0, 1, 1),). See'):\n"
      "  gathered = loop.run_until_complete(gather(message))\n"
      "  loop.run_until_complete(asyncio.sleep(0.01))\n"
      "  del gathered\n"
      "  gc.collect()\n"
      # Epochs a live run deletes while they are read: a read's future, another's coroutine.
      "for message in ('NOT_FOUND: Error opening \"zarr\" driver [tensorstore_spec=\\'{}\\']',\n"
      "                'a bug 3'):\n"
      "  future = loop.create_future()\n"
      "  future.set_exception(ValueError(message))\n"
      "  del future\n"
      "  gc.collect()\n"
      "import types\n"
      "@types.coroutine\n"
      "def suspend():\n"
      "  yield\n"
      "async def read_then_fail(message):\n"
      "  try:\n"
      "    await suspend()\n"
      "  finally:\n"
      "    raise Exception(message)\n"
      "for message in ('Encountered error while reading array index: (slice(0, 32, 1),).',\n"
      "                'a bug 4'):\n"
      "  read = read_then_fail(message)\n"
      "  read.send(None)\n"
      "  del read\n"
      "  gc.collect()\n"
      "loop.close()\n")
  out = run_python("-c", script)
  assert out.returncode == 0, out.stderr
  assert "OUT_OF_RANGE" not in out.stderr and "RESOURCE_EXHAUSTED" not in out.stderr
  assert "NOT_FOUND" not in out.stderr and "reading array index" not in out.stderr
  assert "Task exception was never retrieved" in out.stderr and "ValueError: a bug" in out.stderr
  assert "_GatheringFuture exception was never retrieved" in out.stderr
  assert "ValueError: a bug 2" in out.stderr
  assert "Future exception was never retrieved" in out.stderr and "a bug 3" in out.stderr
  assert "Exception ignored in: <coroutine object read_then_fail" in out.stderr
  assert "Exception: a bug 4" in out.stderr


def test_known_error_is_one_line_and_ctrl_c_exits_130(monkeypatch):
  def bad_input():
    raise ValueError("the data folder is empty")

  def interrupted():
    raise KeyboardInterrupt

  assert _run(monkeypatch, bad_input) == "error: the data folder is empty"
  assert _run(monkeypatch, interrupted) == ("os._exit", 130)  # no teardown waiting on devices
  with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
    _run(monkeypatch, lambda: 1 / 0)


def test_a_stray_argument_is_refused_not_ignored():
  """eval.py's --config has a default: a recipe given without --config would be ignored, and the
  default recipe evaluated instead."""
  script = "from sortkd_jax import cli\ncli.run(lambda: print('ran'))\n"
  done = run_python("-c", script, "configs/cifar_kd.py", timeout=60)
  assert done.returncode != 0 and "ran" not in done.stdout
  assert done.stderr.strip() == ("error: unexpected arguments ['configs/cifar_kd.py']: this "
                                 "script takes flags only (--help lists them)."), done.stderr


def test_flags_after_a_double_dash_are_named_not_taken_as_missing():
  """absl reads nothing after `--` as a flag: a required flag given after it was reported as
  "must have a value other than None", an optional one ignored."""
  for script, args in (("train.py", ["--config", "configs/cifar_kd.py", "--", "--workdir",
                                     "runs/x"]),
                       ("eval.py", ["--", "--checkpoint", "my run"])):
    done = run_script(script, *args, timeout=120)
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == (
        f"error: {shlex.join(args[args.index('--') + 1:])} comes after `--`, which ends the "
        "flags, and this script takes nothing else: drop the `--`."), done.stderr[-2000:]


def test_a_path_printed_to_an_ascii_stdout_is_escaped():
  """export_weights.py and port_weights.py wrote their file, then failed (status 1) printing
  its non-ASCII path to an ASCII stdout."""
  script = "from sortkd_jax import cli\ncli.run(lambda: print('written to /tmp/导出 é'))\n"
  done = run_python("-c", script, env={"PYTHONIOENCODING": "ascii"}, timeout=60)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout == "written to /tmp/\\u5bfc\\u51fa \\xe9\n"


def test_verbosity_1_logs_the_traceback_of_a_known_error():
  script = ("from sortkd_jax import cli\n"
            "def main():\n  raise ValueError('the data folder is empty')\n"
            "cli.run(main)\n")
  for args, traceback in (([], False), (["--verbosity=1"], True)):
    done = run_python("-c", script, *args, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().endswith("error: the data folder is empty")
    assert ("Traceback" in done.stderr) == traceback, done.stderr


def _config_script(tmp_path, shown: str, defines: str = ""):
  """`show(DEFAULT, *args)`: a script that defines --config (recipe DEFAULT, or none for '-')
  and `defines`, parses `args` as the scripts do, then prints the expression `shown`."""
  script = tmp_path / "show.py"
  script.write_text("import sys\nfrom absl import flags\nfrom sortkd_jax import cli\n"
                    "default = sys.argv.pop(1)\n"
                    "cli.define_config_flag(None if default == '-' else default, 'a recipe')\n"
                    f"{defines}config = lambda: flags.FLAGS.config\n"
                    f"cli.run(lambda: print({shown}))\n")
  return lambda *args: run_python(script, *args, env={"PYTHONPATH": "."}, timeout=60)


def test_none_and_whole_tuple_overrides(tmp_path):
  """ml_collections parses `--config.data.max_test_examples=None` as int('None')."""
  show = _config_script(tmp_path, "config().data.max_test_examples, "
                        "config().steps_per_dispatch, config().lr_decay_epochs")
  recipe = "configs/cifar_kd.py:res56_res20,runlocal"
  for default, args in (("-", ["--config", recipe]), (recipe, [])):  # either way of loading
    done = show(default, *args, "--config.data.max_test_examples=5",
                "--config.data.max_test_examples=None", "--config.steps_per_dispatch=None",
                "--config.steps_per_dispatch=2")
    assert done.stdout.split()[:2] == ["None", "2"], done.stderr  # the last override wins
  # absl's other spelling, the value in the next argument
  done = show("-", "--config", recipe, "--config.data.max_test_examples", "5",
              "--config.data.max_test_examples", "None", "--config.steps_per_dispatch", "none",
              "--config.steps_per_dispatch", "2")
  assert done.stdout.split()[:2] == ["None", "2"], done.stderr
  # A tuple given whole replaces the field: ml_collections joined repeated ones into (5, 7).
  for default, args in (("-", ["--config", recipe]), (recipe, [])):
    for last in ("(7,)", "[7]"):  # ml_collections reads a list literal as the tuple too
      done = show(default, *args, "--config.data.max_test_examples=None",
                  "--config.steps_per_dispatch=None", "--config.lr_decay_epochs=(5,)",
                  f"--config.lr_decay_epochs={last}")
      assert done.stdout.split()[2:] == ["(7,)"], done.stderr
    # A bare value after it would be joined to it, (5, 7): refused, as either could be meant.
    done = show(default, *args, "--config.lr_decay_epochs=(5,)", "--config.lr_decay_epochs=7")
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "error: --config.lr_decay_epochs is given whole, (5,), and then as 7, which "
        "ml_collections would add to it: give the tuple once, e.g. "
        "--config.lr_decay_epochs=(7,)."), done.stderr
  # Bare values alone are ml_collections' way to give a tuple: joined.
  done = show("-", "--config", recipe, "--config.lr_decay_epochs=3", "--config.lr_decay_epochs=5")
  assert done.stdout.split()[2:] == ["(3,", "5)"], done.stderr
  done = show("-", "--config", recipe, "--config.batch_size=none")
  assert done.stderr.strip() == ("error: config.batch_size takes a value, not None (only fields "
                                 "that are None in a recipe take None).")
  done = show("-", "--config", recipe, "--config.data.max_test_exampels=None")
  assert "did you mean 'max_test_examples'?" in done.stderr


def test_override_spellings_that_ml_collections_reads_otherwise():
  """A hyphen in a field's name failed with a traceback ('malformed node or string'); one dash or
  a whole tuple in the next argument escaped the whole-tuple rule, joining (5,) and (7,)."""
  assert cli._config_override_spelling([
      "--config.batch-size=32", "-config.lr_decay_epochs", "(5,)", "--config.lr_decay_epochs",
      "[7]", "--no-config.sort", "-no_config.kd.t-x", "--config.data.folder=/a-b", "--x-y=1",
      "--config.data.folder", "(odd)"]) == [
      "--config.batch_size=32", "--config.lr_decay_epochs=(5,)", "--config.lr_decay_epochs=[7]",
      "--noconfig.sort", "--noconfig.kd.t_x", "--config.data.folder=/a-b", "--x-y=1",
      "--config.data.folder=(odd)"]


def test_command_line_slips_are_one_line_errors(tmp_path):
  """A flag left without its value took the next flag as its value (`--workdir $W` with W unset
  trained in a folder named after the next flag); the others were tracebacks or no hint."""
  show = _config_script(tmp_path, "flags.FLAGS.workdir, config().batch_size, config().sort",
                        defines="flags.DEFINE_string('workdir', None, 'a run')\n")
  recipe = "configs/cifar_kd.py:res56_res20"
  done = show("-", "--config", recipe, "--config.batch-size", "32", "--no-config.sort",
              "--workdir", "w")
  assert done.returncode == 0 and done.stdout.split() == ["w", "32", "False"], done.stderr
  for args, error in (
      (("-", "--config", recipe, "--workdir", "--config.batch_size=32"),
       "error: --workdir has no value: the argument after it, --config.batch_size=32, is a flag "
       "(a value that starts with -- goes after =, --workdir=VALUE)."),
      ((recipe, "--flagfile=/nonexistent/flags"), "error: ERROR:: Unable to open flagfile: "
       "[Errno 2] No such file or directory: '/nonexistent/flags'"),
      (("-", "--config", "README.md"), "error: the --config file README.md is not a Python "
       "recipe (invalid character '⇄' (U+21C4), line 6): use configs/<recipe>.py:<pair>, e.g. "
       "--config configs/cifar_kd.py:res32x4_res8x4."),
      ((recipe, "--noconfig.sort=true"), "error: --noconfig.sort=true does not take an argument"),
      ((recipe, "--config.sort", "false"), "error: unexpected arguments ['false']: a boolean "
       "flag takes its value after =, e.g. --config.sort=false.")):
    done = show(*args)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == error, done.stderr
    assert "Traceback" not in done.stderr


def test_a_bare_field_flag_a_missing_recipe_or_a_non_boolean_is_explained(tmp_path):
  """`--lr=0.1` said only "Unknown command line flag 'lr'"; a --config file that is missing
  or a folder gave Python's errno text without the flag; `--config.sort=maybe` absl's tuple; a
  tuple without its closing bracket the advice to quote it, which makes it a string."""
  show = _config_script(tmp_path, "config().lr")
  recipe = "configs/cifar_kd.py:res56_res20"
  recipes = "; the recipes: configs/cifar_ctkd.py, configs/cifar_dkd.py, configs/cifar_kd.py, "
  for args, error in (
      ((recipe, "--lr=0.1"), "error: unknown flag --lr: config fields are set as "
       "--config.lr=VALUE."),
      (("-", "--config", recipe, "--nosort"), "error: unknown flag --nosort: config fields are "
       "set as --config.sort=VALUE."),
      (("-", "--config", recipe, "--kd.temperature=3"), "error: unknown flag --kd.temperature: "
       "config fields are set as --config.kd.temperature=VALUE."),
      ((recipe, "--config.sort=maybe"), "error: --config.sort=maybe: a boolean field takes true "
       "or false (or t/f, 1/0)."),
      ((recipe, "--config.lr_decay_epochs=(150,180"), "error: --config.lr_decay_epochs=(150,180 is "
       "not a tuple: write it whole, in matching brackets, e.g. "
       "--config.lr_decay_epochs=(150,180,210)."),
      (("-", "--config", "configs/cifar_kd"), "error: the --config file configs/cifar_kd: no such "
       "file or directory; use configs/<recipe>.py:<pair>, e.g. --config "
       f"configs/cifar_kd.py:res32x4_res8x4{recipes}"),
      (("-", "--config=configs:x"), "error: the --config file configs: is a directory; use "
       f"configs/<recipe>.py:<pair>, e.g. --config configs/cifar_kd.py:res32x4_res8x4{recipes}")):
    done = show(*args)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1].startswith(error), (
        done.stderr)
    assert "Traceback" not in done.stderr
  unknown = show(recipe, "--foo=1")  # not a field: absl's own message
  assert unknown.stderr.strip().splitlines()[-1].startswith("error: Unknown command line flag "
                                                            "'foo'"), unknown.stderr


def test_an_override_inside_a_value_or_of_a_top_level_field_in_a_group_is_named(tmp_path):
  """`--config.method.sort=True` gave a 35-line TypeError traceback, `--config.lr.x=1` said the
  config had no field 'float', `--config.kd.sort` that it had no field 'sort'."""
  show = _config_script(tmp_path, "config().lr")
  recipe = "configs/cifar_kd.py:res56_res20"
  for default, args in (("-", ["--config", recipe]), (recipe, [])):  # either way of loading
    for override, error in (
        ("--config.method.sort=True", "config.method is a value (str), not a group of fields: "
                                      "--config.method=VALUE sets it."),
        ("--config.kd.temperature.x=1", "config.kd.temperature is a value (float), not a group "
                                        "of fields: --config.kd.temperature=VALUE sets it."),
        ("--config.kd.sort=True", "config.kd.sort does not exist; sort is top-level: "
                                  "--config.sort.")):
      done = show(default, *args, override)
      assert done.returncode == 1 and done.stderr.strip() == f"error: {error}", done.stderr


def test_either_spelling_of_a_flag_name_parses():
  flags.DEFINE_integer("spelling-test-size", 1, "A hyphenated flag, as benchmark.py's.")
  flags.DEFINE_boolean("spelling_test_eval", True, "An underscored one, as train.py's.")
  try:
    for negation in ("--nospelling-test-eval", "--no-spelling_test_eval"):  # --no-eval too
      flags.FLAGS["spelling_test_eval"].value = True
      cli.parse_flags_briefly(["script", "--spelling_test_size=8", negation])
      assert flags.FLAGS["spelling-test-size"].value == 8
      assert flags.FLAGS["spelling_test_eval"].value is False
    for untouched in ("--spelling-test-size=3", "--config.data.max_test_examples=3",
                      "--unknown-flag", "positional"):
      assert cli._defined_spelling(untouched) == untouched
    # After "--" arguments are not flags, nor respelt: named as typed.
    with pytest.raises(SystemExit, match="error: --spelling_test_size comes after `--`"):
      cli.parse_flags_briefly(["script", "--", "--spelling_test_size"])
  finally:
    delattr(flags.FLAGS, "spelling-test-size")
    delattr(flags.FLAGS, "spelling_test_eval")


@pytest.mark.parametrize("args,expected", [
    (["--cfg", "configs/cifar100/dkd/wrn40_2_wrn_16_2.yaml"],
     "instead of configs/cifar100/dkd/wrn40_2_wrn_16_2.yaml, --config "
     "configs/cifar_dkd.py:wrn40_2_wrn16_2"),
    (["--config=configs/cifar100/kd.yaml"], "--config configs/cifar_kd.py:res32x4_res8x4"),
    (["--cfg", "configs/cifar100/vanilla.yaml"],
     "--config configs/cifar_vanilla.py:res32x4_res8x4"),
    (["--config", "mdistiller/configs/imagenet/r50_mv1/dkd.yaml", "--workdir", "w"],
     "--config configs/imagenet_dkd.py:r50_mv1"),
    (["--cfg", "configs/cifar100/crd.yaml"], "--config configs/<recipe>.py:<pair>, a recipe"),
    (["--cfg=configs/x.py"], "the recipe is --config configs/<recipe>.py:<pair>"),
    (["--config", "configs/cifar_kd.py", "--resume"], "there is no --resume: the same command"),
    (["--config", "configs/cifar_kd.py", "--config.pair=wrn40_2_wrn16_2"],
     "config.pair only records the recipe's pair: choose the pair in the recipe argument"),
    (["--config", "configs/cifar_kd.py", "SOLVER.LR", "0.1"],
     "overrides are --config.FIELD=VALUE, not mdistiller's KEY VALUE (SOLVER.LR)"),
    (["-m", "resnet32x4", "-c", "download_ckpts/x.pth"],
     "mdistiller's tools/eval.py -m MODEL -c FILE is python scripts/eval.py --checkpoint FILE"),
    (["--model=resnet8x4", "--ckpt=student_best"], "or name it with --arch MODEL"),
    (["-config", "configs/cifar100/kd.yaml"], "--config configs/cifar_kd.py:res32x4_res8x4"),
    (["--config", "x.yaml:res32x4_res8x4"], "instead of x.yaml:res32x4_res8x4, --config"),
    (["--config", "configs/cifar_kd.py", "-config.pair=wrn40_2_wrn16_2"],
     "config.pair only records the recipe's pair"),
])
def test_mdistiller_usage_says_what_to_type_instead(monkeypatch, args, expected):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags_briefly(["train.py", *args])
  message = exit_info.value.code
  assert message.startswith("error: ") and expected in message, message
  assert message.endswith("(README: Coming from mdistiller).")


@pytest.mark.parametrize("override,expected", [
    ("--config.kd.T=2", "no field 'T'; mdistiller's T is 'temperature' here"),
    ("--config.dkd.BETA=2", "no field 'BETA'; mdistiller's BETA is 'beta' here"),
    ("--config.SOLVER.LR=0.1", "for mdistiller's SOLVER, its fields are top-level here: "
                               "--config.lr,"),
    ("--config.teacher=resnet56", "config.teacher is a group of fields, not a value: set one "
                                  "of them, e.g. --config.teacher.name=resnet56 (its fields: "
                                  "checkpoint, fold_batchnorm, name)."),
    ("--config.kd.temprature=3", "no field 'temprature'; did you mean 'temperature'?"),
])
def test_config_overrides_in_mdistillers_names_say_ours(override, expected):
  out = run_script("train.py", "--config", "configs/cifar_kd.py", "--workdir", "unused", override)
  assert out.returncode == 1 and expected in out.stderr.splitlines()[-1], out.stderr


def test_a_tilde_after_an_equals_sign_is_expanded_as_the_shell_would(monkeypatch):
  """absl takes `-flag=value` too; a `~` inside a value, or of an unknown user, stays."""
  monkeypatch.setenv("HOME", "/home/me")
  assert cli._expand_tildes(["--workdir=~/runs/x", "-workdir=~", "--config.data.folder=~/d",
                             "--dst=a~/b", "--x=~nosuchuser_sortkd/y", "~/positional"]) == [
      "--workdir=/home/me/runs/x", "-workdir=/home/me", "--config.data.folder=/home/me/d",
      "--dst=a~/b", "--x=~nosuchuser_sortkd/y", "~/positional"]


def test_a_config_file_that_is_not_a_recipe_is_named_so():
  """ml_collections' AttributeError names its module 'config_config', which was taken for a
  missing field of that name."""
  for script, config, other in (("train.py", "configs/common.py", "--workdir=unused"),
                                ("eval.py", "sortkd_jax/sort.py", "--checkpoint=unused")):
    out = run_script(script, "--config", config, other)
    assert out.returncode == 1 and out.stderr.splitlines()[-1] == (
        "error: the --config file has no get_config(), so it is not a recipe: use one of "
        "configs/cifar_*.py or configs/imagenet_*.py, e.g. "
        "--config configs/cifar_kd.py:res32x4_res8x4."), out.stderr[-2000:]


def test_our_own_usage_is_not_taken_for_mdistillers():
  for args in (["--config", "configs/cifar_kd.py:res32x4_res8x4", "--workdir", "RUNS.A"],
               ["--config.lr=0.1", "--config.data.folder=data/cifar-100-python"]):
    assert cli._mdistiller_usage(args) is None


def test_launch_commands_in_docstrings_keep_their_line_continuations():
  """Scripts show their docstring as --help and configs hold their launch command: a `\\` at a
  line's end must survive (a non-raw docstring joins the lines into one of long spaces)."""
  import ast
  import glob
  import os

  from helpers import REPO
  files = glob.glob(os.path.join(REPO, "scripts", "*.py")) + glob.glob(
      os.path.join(REPO, "configs", "*.py"))
  continued = 0
  for path in files:
    with open(path) as f:
      source = f.read()
    docstring = ast.get_docstring(ast.parse(source), clean=False) or ""
    for line in source.splitlines():
      if line.endswith(" \\") and line.strip().startswith(("python", "--")):
        assert line + "\n" in docstring + "\n", (path, line)
        continued += 1
  assert continued >= 6  # the scripts' and ImageNet recipes' commands


@pytest.mark.parametrize("script", ["train.py", "eval.py", "benchmark.py"])
def test_help_lists_the_config_flag(script):
  """--help shows the script's own flags; --config is defined in cli.py for all of them."""
  out = run_script(script, "--help")  # absl exits with status 1 after --help
  own = out.stdout.split(f"scripts/{script}:", 1)[1]
  assert "\n  --config: " in own, out.stdout


def test_a_ctrl_c_the_launching_shell_ignores_stays_ignored(monkeypatch):
  """A script's `python scripts/train.py ... &` (no job control) starts the run with SIGINT
  ignored, so a Ctrl-C at the script's terminal spares it; cli.run replaced that with its own
  handler, and the Ctrl-C ended the run."""
  import os
  import time

  def main():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # a handler would have raised by now

  launched_with = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    assert _run(monkeypatch, main) is None  # returned: the run went on to its end
  finally:
    signal.signal(signal.SIGINT, launched_with)


@pytest.mark.usefixtures("python_sigint_handler")
def test_ctrl_c_inside_asyncio_run_is_not_absorbed(monkeypatch):
  """asyncio.run swaps Python's default SIGINT handler for one that cancels its task; a task
  that absorbs the cancellation (as library code may) then absorbed the Ctrl-C: the script
  went on and exited 0. cli.run's own handler is left alone by asyncio."""
  import asyncio
  import os

  async def absorbs_cancellation():
    try:
      os.kill(os.getpid(), signal.SIGINT)
      await asyncio.sleep(5)
    except asyncio.CancelledError:
      pass

  def main():
    asyncio.run(absorbs_cancellation())

  assert _run(monkeypatch, main) == ("os._exit", 130)


@pytest.mark.usefixtures("python_sigint_handler")
def test_ctrl_c_in_a_garbage_collector_callback_is_not_dropped(monkeypatch):
  """Python drops an exception raised in a gc callback (JAX registers one), KeyboardInterrupt
  too: a Ctrl-C landing there let the run carry on. cli.run signals it again."""
  import gc
  import time

  def interrupted_callback(phase, info):
    gc.callbacks.remove(interrupted_callback)
    raise KeyboardInterrupt  # as the SIGINT handler does when the signal lands here

  def main():
    gc.callbacks.append(interrupted_callback)
    gc.collect()
    for _ in range(500):  # where the redelivered signal lands, within 5 s
      time.sleep(0.01)

  assert _run(monkeypatch, main) == ("os._exit", 130)
