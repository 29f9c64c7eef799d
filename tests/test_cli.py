"""What every script shares: known errors as one line, Ctrl-C without a traceback."""

import sys

import pytest
from absl import flags

from sortkd_jax import cli


def _run(monkeypatch, main, **kwargs):
  monkeypatch.setattr(sys, "argv", ["script"])
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # cli.run filters it
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main, **kwargs)
  return exit_info.value.code


def test_known_error_is_one_line_and_ctrl_c_exits_130(monkeypatch):
  def bad_input():
    raise ValueError("the data folder is empty")

  def interrupted():
    raise KeyboardInterrupt

  def exit_now(code):  # os._exit would end pytest too
    raise SystemExit(("os._exit", code))

  assert _run(monkeypatch, bad_input) == "error: the data folder is empty"
  monkeypatch.setattr(cli.os, "_exit", exit_now)
  assert _run(monkeypatch, interrupted) == ("os._exit", 130)  # no teardown waiting on devices
  with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
    _run(monkeypatch, lambda: 1 / 0)


def test_either_spelling_of_a_flag_name_parses():
  flags.DEFINE_integer("spelling-test-size", 1, "A hyphenated flag, as benchmark.py's.")
  flags.DEFINE_boolean("spelling_test_eval", True, "An underscored one, as train.py's.")
  try:
    cli.parse_flags_briefly(["script", "--spelling_test_size=8", "--nospelling-test-eval"])
    assert flags.FLAGS["spelling-test-size"].value == 8
    assert flags.FLAGS["spelling_test_eval"].value is False
    for untouched in ("--spelling-test-size=3", "--config.data.max_test_examples=3",
                      "--unknown-flag", "positional"):
      assert cli._defined_spelling(untouched) == untouched
    # After "--" arguments are not flags: they stay as typed.
    assert cli.parse_flags_briefly(["script", "--", "--spelling_test_size"])[1:] == [
        "--spelling_test_size"]
  finally:
    delattr(flags.FLAGS, "spelling-test-size")
    delattr(flags.FLAGS, "spelling_test_eval")
