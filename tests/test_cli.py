"""What every script shares: known errors as one line, Ctrl-C without a traceback."""

import sys

import pytest

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

  assert _run(monkeypatch, bad_input) == "error: the data folder is empty"
  assert _run(monkeypatch, interrupted) == 130
  with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
    _run(monkeypatch, lambda: 1 / 0)
