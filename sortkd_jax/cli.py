"""What the scripts share: `--config` and flag errors in one line, quiet library logs, and
known errors (bad input, a diverged run) reported as one `error:` line, not a traceback."""

from __future__ import annotations

import _thread
import functools
import gc
import logging as std_logging
import os
import re
import shlex
import signal
import sys
import threading
from typing import Any, Callable, Sequence

from absl import app, flags, logging


# Bad input (config, data, checkpoints), a missing optional package (torch for .pth files) or a
# diverged run: what the library raises with a message saying what to do.
KNOWN_ERRORS = (ValueError, OSError, RuntimeError, ImportError, FloatingPointError)


def run(main: Callable[[], None], errors: tuple[type[Exception], ...] = KNOWN_ERRORS) -> None:
  """`app.run` for a script whose `main()` takes no positional arguments.

  INFO logs without library chatter; an exception of `errors` becomes one `error:` line (its
  traceback is still logged with --verbosity=1), and Ctrl-C exits (130) without a traceback.
  SIGTERM keeps its default, an immediate exit: handled as Ctrl-C, a run would first finish the
  steps it has queued on the device (minutes on a CPU), and checkpoints survive a kill anyway.
  In a multi-process run any error ends this process at once (status 1), which ends the others'
  waits for it, instead of JAX's 5-minute shutdown barrier; so does an error that leaves
  threads of the work waiting (orbax's, after some failed saves), which the exit would wait for.
  """

  def run_main(argv: list[str]) -> None:
    if len(argv) > 1:
      boolean = any(a.lower() in ("true", "false") for a in argv[1:])
      sys.exit(f"error: unexpected arguments {argv[1:]}: " + (
          "a boolean flag takes its value after =, e.g. --config.sort=false." if boolean
          else "this script takes flags only (--help lists them)."))
    # A process started with Ctrl-C ignored (`cmd &` in a script: without job control, the
    # shell's way to spare background jobs the terminal's Ctrl-C) keeps ignoring it.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
      signal.signal(signal.SIGINT, _interrupt)
    # A path with non-ASCII characters printed to an ASCII stdout (PYTHONIOENCODING=ascii, an
    # old locale) failed the script after its work was written: escaped instead.
    sys.stdout.reconfigure(errors="backslashreplace")
    if not flags.FLAGS["verbosity"].present:  # --verbosity=1 also logs debug lines
      logging.set_verbosity(logging.INFO)
    quiet_library_info_logs()
    quiet_unawaited_checkpoint_io()
    redeliver_dropped_interrupts()
    threads_before = set(threading.enumerate())
    try:
      main()
      return
    except errors as e:
      logging.debug("Traceback:", exc_info=True)
      message = f"error: {e}"
    except KeyboardInterrupt:  # what the work in hand logged is enough; no traceback
      # Out at once: the interpreter's teardown would first wait for the steps still queued on
      # the device (minutes on a CPU), and could crash meanwhile (SIGSEGV, 1 exit in 3 seen).
      # The work's own `finally` blocks have closed its checkpoints and logs by now.
      _exit_now(130)
    except Exception:
      if _joined_process() is None:
        raise
      logging.exception("Unexpected error:")
      message = "error: the traceback above"
    process = _joined_process()
    if process is not None:
      # JAX's exit would wait up to 5 minutes at a shutdown barrier for the other processes,
      # which wait for this one in a collective: leaving at once ends their collective too.
      print(f"{message} ({process}; another process's failure shows here as a failed "
            "collective or a lost connection: see every process's output)", file=sys.stderr)
      _exit_now(1)
    if any(t.is_alive() and not t.daemon for t in set(threading.enumerate()) - threads_before):
      # Left waiting, e.g. orbax's threads for the folder of a save that failed to make it: the
      # interpreter's exit would wait for them (5 minutes) after the error was printed.
      print(message, file=sys.stderr)
      _exit_now(1)
    gc.collect()  # with the error gone, what it held (orbax's pending reads) ends quietly now
    sys.exit(message)

  app.run(run_main, flags_parser=parse_flags_briefly)


def _interrupt(signum: int, frame: Any) -> None:
  """Ctrl-C as Python's default handler takes it, but not that very function: `asyncio.run`
  (inside orbax and tfds) replaces only the default one, with a handler that cancels its task,
  and a task that absorbs the cancellation then absorbed the Ctrl-C too."""
  raise KeyboardInterrupt


def _joined_process() -> str | None:
  """'process I of N' when this process joined a multi-process run, else None."""
  jax = sys.modules.get("jax")  # a script that never imported JAX joined no run
  if jax is None or not jax.distributed.is_initialized():
    return None
  try:
    return f"process {jax.process_index()} of {jax.process_count()}"
  except Exception:  # the devices failed after the join: the run is multi-process all the same
    return "a process of a multi-process run"


def _exit_now(status: int) -> None:
  """Exits without the interpreter's teardown (logs and output flushed first)."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def parse_flags_briefly(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config error in one line, not a traceback, and either
  spelling of a flag name (`--batch-size`, `--batch_size`).

  ml_collections reports errors in config files (e.g. an unknown pair) with the file's
  traceback; the last line says what is wrong.
  """
  flag_args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  rest = argv[1 + len(flag_args):]
  if rest[1:]:  # absl reads nothing after `--` as a flag: a required one after it was "None"
    sys.exit(f"error: {shlex.join(rest[1:])} comes after `--`, which ends the flags, and this "
             "script takes nothing else: drop the `--`.")
  spelt = _config_override_spelling(flag_args)
  if sys.argv[1:1 + len(flag_args)] == flag_args:  # ml_collections reads the overrides there
    sys.argv[1:1 + len(flag_args)] = spelt
  flag_args = spelt
  instead = _mdistiller_usage(flag_args)
  if instead:
    sys.exit(f"error: {instead} (README: Coming from mdistiller).")
  try:
    flag_args = [*map(_defined_spelling, _take_none_overrides(_last_tuple_literal_wins(
        _expand_tildes(flag_args))))]
    argv = flags.FLAGS([argv[0], *flag_args, *rest])
    _check_values_given(flag_args)
    if "config" in flags.FLAGS:
      flags.FLAGS.config.to_dict()  # a config that failed to load raises only when read
      apply_none_overrides(flags.FLAGS.config)
    return argv
  except (AttributeError, KeyError, TypeError) as e:  # an override of a field the config lacks
    sys.exit(_misplaced_override(flag_args) or _unknown_field_message(e, args=flag_args))
  except SyntaxError as e:  # a --config that is not Python, or a recipe of one's own
    sys.exit(f"error: the --config file {e.filename} is not a Python recipe ({e.msg}, line "
             f"{e.lineno}): use configs/<recipe>.py:<pair>, e.g. "
             "--config configs/cifar_kd.py:res32x4_res8x4.")
  except (flags.Error, OSError, ValueError) as e:
    group = re.search(r"flag --config\.([\w.]+)=(.*): Failed to parse .* as a ConfigDict", str(e))
    if group:  # e.g. --config.teacher=resnet56
      field = "name" if group[1] in ("teacher", "student") else "FIELD"
      sys.exit(f"error: config.{group[1]} is a group of fields, not a value: set one of them, "
               f"e.g. --config.{group[1]}.{field}={group[2]}{_fields_of(group[1])}.")
    unclosed = re.search(r"flag (--config\.[\w.]+)=(.*): Error while parsing string: .* as tuple",
                         str(e))
    if unclosed:  # ml_collections' advice, to quote it, would make it a string
      sys.exit(f"error: {unclosed[1]}={unclosed[2]} is not a tuple: write it whole, in matching "
               f"brackets, e.g. {unclosed[1]}=(150,180,210).")
    boolean = re.search(r"flag (--config\.[\w.]+=.*): \('Non-boolean argument", str(e))
    if boolean:  # absl's message is a tuple's repr
      sys.exit(f"error: {boolean[1]}: a boolean field takes true or false (or t/f, 1/0).")
    if isinstance(e, flags.UnrecognizedFlagError) and _config_field(e.flagname) is not None:
      sys.exit(f"error: unknown flag --{e.flagname}: config fields are set as "
               f"--config.{_config_field(e.flagname)}=VALUE.")
    while isinstance(e.__cause__ or e.__context__, (flags.Error, OSError)):
      e = e.__cause__ or e.__context__  # the first failure, e.g. the missing config file
    unread = re.search(r"(?:^|Failed loading config file .*)\[Errno \d+\] ([^:\n]+): "
                       r"'([^'\n]*)'$", str(e), re.S)
    if unread and isinstance(e, OSError) and unread[2] in _config_files(flag_args):
      # (ml_collections' own report names the flag config_config)
      sys.exit(f"error: the --config file {unread[2]}: {unread[1].lower()}; use "
               "configs/<recipe>.py:<pair>, e.g. --config configs/cifar_kd.py:res32x4_res8x4"
               f"{_recipes_here()}.")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    sys.exit(f"error: {last.split(': ', 1)[-1] if last.startswith('ValueError') else last}")


def _config_field(flag_name: str) -> str | None:
  """The config field that a bare flag such as `--lr` or `--nosort` names, if any."""
  try:
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
  except Exception:  # the config failed to load: nothing to compare with
    return None
  for name in (flag_name, flag_name.removeprefix("no")):
    field = name.replace("-", "_")
    try:
      if config is not None and field and not field.startswith("config."):
        functools.reduce(lambda group, key: group[key], field.split("."), config)
        return field
    except (KeyError, TypeError, AttributeError):
      continue
  return None


def _config_values(args: Sequence[str]) -> list[str]:
  """The `FILE[:ARG]` of each `--config` flag."""
  values = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
  return values + [value for flag, value in zip(args, args[1:]) if flag == "--config"]


def _config_files(args: Sequence[str]) -> list[str]:
  """The files that `--config FILE[:ARG]` flags name, as given and with `~` expanded."""
  files = [value.split(":", 1)[0] for value in _config_values(args)]
  return files + [os.path.expanduser(f) for f in files]


def _fields_of(group: str, recipe: str | None = None) -> str:
  """` (its fields: a, b)` for a group ('' for the top level) of the loaded config, or of the
  recipe `recipe` (FILE[:ARG]) loaded again without overrides, as one that failed is not kept;
  else ''."""
  from ml_collections.config_flags import config_flags
  try:
    fields = (config_flags.ConfigFileFlagParser(name="config").parse(os.path.expanduser(recipe))
              if recipe else flags.FLAGS["config"].value)
    for key in filter(None, group.split(".")):
      fields = fields[key]
    return f" (its fields: {', '.join(fields.keys())})"
  except Exception:  # no config, or not a group: the message stands without the list
    return ""


def _recipes_here() -> str:
  """`; the recipes: configs/cifar_kd.py, ...` where this checkout's configs/ is, else ''."""
  where = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  names = sorted(n for n in (os.listdir(where) if os.path.isdir(where) else [])
                 if n.endswith(".py") and n.startswith(("cifar_", "imagenet_")))
  return f"; the recipes: {', '.join(f'configs/{n}' for n in names)}" if names else ""


def _check_values_given(args: list[str]) -> None:
  """absl takes the argument after `--FLAG` as its value even when it is another flag:
  `--workdir $W --config.lr=0.3` with W unset trained in a folder named `--config.lr=0.3`."""
  for arg, following in zip(args, args[1:]):
    name = arg.lstrip("-")
    if (arg.startswith("-") and "=" not in arg and following.startswith("--")
        and name in flags.FLAGS and not flags.FLAGS[name].boolean):
      sys.exit(f"error: {arg} has no value: the argument after it, {following}, is a flag (a "
               f"value that starts with -- goes after =, {arg}=VALUE).")


def _config_override_spelling(args: list[str]) -> list[str]:
  """Config overrides as the steps below and ml_collections read them: `--config.batch-size`
  (a hyphen: ml_collections failed with a traceback) as `--config.batch_size`, `-config.X` and
  `--no-config.X` with two dashes and `no`, and a whole tuple in the next argument,
  `--config.X (5,)`, as `--config.X=(5,)` (else joined to earlier values of X)."""
  spelt, args = [], list(args)
  while args:
    arg = args.pop(0)
    match = re.fullmatch(r"--?(no[-_]?)?config\.([\w.-]+)(=.*)?", arg, re.DOTALL)
    if match:
      arg = f"--{'no' if match[1] else ''}config.{match[2].replace('-', '_')}{match[3] or ''}"
      if not match[1] and not match[3] and args and args[0][:1] in ("(", "["):
        arg = f"{arg}={args.pop(0)}"
    spelt.append(arg)
  return spelt


_MDISTILLER_YAML = re.compile(r"(?:^|/)(cifar100|imagenet)/(?:(\w+)/)?(\w+)\.ya?ml$")


def _mdistiller_usage(args: list[str]) -> str | None:
  """What to type instead of mdistiller's `tools/train.py` usage (`--cfg FILE.yaml`, a YAML
  --config, `--resume`, `KEY VALUE` overrides, a pair chosen by an override) or its
  `tools/eval.py -m MODEL -c FILE`, or None for a command line without it."""
  for i, arg in enumerate(args):
    name, _, value = arg.partition("=")
    if name in ("-cfg", "-config"):  # absl takes one dash too
      name = f"-{name}"
    if name in ("--cfg", "--config") and not value and i + 1 < len(args):
      value = args[i + 1]
    if name in ("--cfg", "--config") and re.search(r"\.ya?ml(:.*)?$", value):
      return (f"the recipes are Python files, not mdistiller's YAML: instead of {value}, "
              f"--config {_recipe_for(value)}")
    if name == "--cfg":
      return "the recipe is --config configs/<recipe>.py:<pair>"
    if name == "--config.pair":
      return ("config.pair only records the recipe's pair: choose the pair in the recipe "
              "argument, e.g. --config configs/cifar_dkd.py:wrn40_2_wrn16_2, which sets its "
              "teacher, student and per-pair settings (lr, DKD's beta)")
    if name in ("-m", "-c", "--model", "--ckpt"):
      return ("mdistiller's tools/eval.py -m MODEL -c FILE is python scripts/eval.py "
              "--checkpoint FILE (a .pth, a ported folder or a workdir; the architecture is "
              "found from the file's keys, or name it with --arch MODEL)")
    if name == "--resume":
      return ("there is no --resume: the same command again (same --config and --workdir) "
              "resumes from the last saved epoch")
    follows_a_flag = i > 0 and args[i - 1].startswith("--") and "=" not in args[i - 1]
    if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", arg) and not follows_a_flag:
      return (f"overrides are --config.FIELD=VALUE, not mdistiller's KEY VALUE ({arg}): e.g. "
              "--config.lr=0.1 for SOLVER.LR 0.1, --config.kd.temperature=4 for KD.TEMPERATURE 4")
  return None


def _recipe_for(yaml_path: str) -> str:
  """sortkd-jax's recipe for one of mdistiller's CIFAR-100/ImageNet KD, DKD or vanilla YAMLs:
  `cifar100/dkd/wrn40_2_wrn_16_2.yaml` → `configs/cifar_dkd.py:wrn40_2_wrn16_2`."""
  found = _MDISTILLER_YAML.search(yaml_path)
  if found:
    dataset, folder, stem = found.groups()
    if dataset == "cifar100" and folder is None and stem in ("vanilla", "kd"):
      return f"configs/cifar_{stem}.py:res32x4_res8x4"
    if dataset == "cifar100" and folder == "dkd":
      return f"configs/cifar_dkd.py:{stem.replace('_wrn_', '_wrn')}"
    if dataset == "imagenet" and folder and stem in ("kd", "dkd"):
      return f"configs/imagenet_{stem}.py:{folder}"
  return ("configs/<recipe>.py:<pair>, a recipe of configs/ (cifar_vanilla, cifar_kd, "
          "cifar_dkd, cifar_lskd, cifar_ctkd, imagenet_kd, ...) and a teacher_student pair")


def _defined_spelling(arg: str) -> str:
  """`--num-classes=3` → `--num_classes=3` when only the underscore spelling is a flag, and
  the other way round (`--noeval`-style negations too); anything else is left as it is."""
  if not arg.startswith("--"):
    return arg
  name, sep, value = arg[2:].partition("=")
  if name in flags.FLAGS:
    return arg
  if re.match(r"no[-_]", name):  # --no-eval, --no_eval: absl's is --noeval
    name = "no" + name[3:]
  for other in (name, name.replace("-", "_"), name.replace("_", "-")):
    negated = other[2:] if other.startswith("no") else None
    if other in flags.FLAGS or (negated in flags.FLAGS and flags.FLAGS[negated].boolean):
      return f"--{other}{sep}{value}"
  return arg


# `--config.FIELD=None` overrides: ml_collections parses them as the field's type (int('None')
# fails), so they are taken off the command line and applied after it is parsed.
_NONE_OVERRIDES: list[str] = []


def _expand_tildes(args: list[str]) -> list[str]:
  """`--FLAG=~/path` with its `~` expanded, as the shell expands `--FLAG ~/path`: after `=` it
  leaves `~` alone, and a run then made a folder named `~` in the working directory."""
  return [re.sub(r"^(--?[\w.-]+=)(~[^/]*)(?=/|$)", lambda m: m[1] + os.path.expanduser(m[2]), arg)
          for arg in args]


def _take_none_overrides(args: list[str]) -> list[str]:
  """`args` without their `--config.FIELD=None` (or `--config.FIELD None`) overrides, which are
  kept for later (unless a later override of the field, which wins, gives it a value)."""
  kept, args = [], list(args)
  while args:
    arg = args.pop(0)
    if re.fullmatch(r"--config\.[\w.]+", arg) and args and args[0].lower() == "none":
      arg = f"{arg}={args.pop(0)}"
    match = re.fullmatch(r"--config\.([\w.]+)(?:=(.*))?", arg)  # or its value in the next arg
    if match and match[1] in _NONE_OVERRIDES:
      _NONE_OVERRIDES.remove(match[1])
    if match and (match[2] or "").lower() == "none":  # it overrides the earlier values too
      kept = [a for a in kept if not a.startswith(f"--config.{match[1]}=")]
      _NONE_OVERRIDES.append(match[1])
    else:
      kept.append(arg)
  return kept


def _last_tuple_literal_wins(args: list[str]) -> list[str]:
  """`args` without the overrides of a field that a later `--config.FIELD=(...)` sets whole:
  ml_collections joins every occurrence of a tuple field's flag, so appending
  `--config.lr_decay_epochs=(7,)` to a command holding `=(5,)` gave (5, 7). A bare value after
  a whole one (`=(5,)`, then `=7`) is refused: joined, it gave (5, 7) too."""
  field = lambda arg: re.match(r"--config\.([\w.]+)=", arg)  # noqa: E731
  kept, whole = [], {}
  for arg in args:
    name, value = (field(arg)[1], arg.partition("=")[2]) if field(arg) else (None, None)
    if name and value[:1] in ("(", "["):
      kept = [a for a in kept if not (field(a) and field(a)[1] == name)]
      whole[name] = value
    elif name in whole:
      raise flags.Error(f"--config.{name} is given whole, {whole[name]}, and then as {value}, "
                        "which ml_collections would add to it: give the tuple once, e.g. "
                        f"--config.{name}=({value.rstrip(',')},).")
    kept.append(arg)
  return kept


def apply_none_overrides(config: Any, recipe: Any | None = None) -> None:
  """Sets the fields of `--config.FIELD=None` to None in `config`: only those that `recipe`
  (`config` itself by default) declares optional (None by default, e.g.
  data.max_test_examples, steps_per_dispatch); others need a value."""
  from ml_collections import FieldReference
  for path in _NONE_OVERRIDES:
    *groups, name = path.split(".")
    group, recipe_group = config, config if recipe is None else recipe
    for key in groups:
      group, recipe_group = group[key], recipe_group[key]
    recipe_group[name]  # an unknown field: ml_collections' KeyError, with its suggestion
    if not isinstance(recipe_group._fields[name], FieldReference):
      raise flags.Error(f"config.{path} takes a value, not None (only fields that are None in "
                        "a recipe take None).")
    group[name] = None


def define_config_flag(default: str | None, help_string: str, **kwargs: Any) -> None:
  """`--config`, an ml_collections config file, whose errors `parse_flags_briefly` reports.

  With a default, ml_collections loads it and applies the command line's `--config.*`
  overrides at once, when the flag is defined: an override typo fails here, not in absl's parse.
  """
  from ml_collections import config_flags
  if default is not None:  # its overrides are read from sys.argv now
    end = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    try:
      sys.argv[1:end] = _take_none_overrides(_last_tuple_literal_wins(
          _expand_tildes(_config_override_spelling(sys.argv[1:end]))))
    except flags.Error as e:
      sys.exit(f"error: {e}")
  try:
    config_flags.DEFINE_config_file("config", default, help_string, **kwargs)
  except flags.Error as e:  # e.g. a --flagfile that does not exist, read here by ml_collections
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError, TypeError) as e:
    sys.exit(_misplaced_override(sys.argv[1:], default)
             or _unknown_field_message(e, default, sys.argv[1:]))
  # A flag of the script, so that --help (the main module's flags) lists it.
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["config"])


# mdistiller's YAML names (and its Sort-KD fork's) that are spelt otherwise here.
_MDISTILLER_FIELDS = {
    "T": "temperature", "TEMPERATURE": "temperature", "CE_WEIGHT": "ce_weight",
    "KD_WEIGHT": "kd_weight", "ALPHA": "alpha", "BETA": "beta", "WARMUP": "warmup_epochs",
    "LR": "lr", "EPOCHS": "num_epochs", "BATCH_SIZE": "batch_size",
    "WEIGHT_DECAY": "weight_decay", "MOMENTUM": "momentum", "LR_DECAY_STAGES": "lr_decay_epochs",
    "LR_DECAY_RATE": "lr_decay_rate",
}
_MDISTILLER_GROUPS = {
    "solver": "its fields are top-level here: --config.lr, --config.batch_size, "
              "--config.num_epochs, --config.lr_decay_epochs, --config.weight_decay and others",
    "distiller": "--config.method, --config.teacher.name, --config.student.name",
}


def _misplaced_override(args: list[str], default: str | None = None) -> str | None:
  """The error for the first `--config.A.B` whose B is not inside `config.A`, where config.A is
  a value, not a group of fields (ml_collections said `no field 'float'`, or raised a bare
  TypeError), or where B is a top-level field (`--config.kd.sort`). `default`: the recipe
  when `args` name none."""
  recipe = default
  for i, arg in enumerate(args):
    if arg == "--config" and i + 1 < len(args):
      recipe = args[i + 1]
    elif arg.startswith("--config="):
      recipe = arg.partition("=")[2]
  try:  # ml_collections' own parser, an internal path: the check is skipped if it moves
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser  # noqa: PLC0415
    config = ConfigFileFlagParser(name="config").parse(recipe)
  except Exception:  # noqa: BLE001 - no recipe to check against: ml_collections' message
    return None
  for arg in args:
    match = re.match(r"--config\.([\w.]+)(?:=|$)", arg)
    if not match:
      continue
    group, *names = None, *match[1].split(".")
    for depth, name in enumerate(names):
      path = ".".join(names[:depth + 1])
      if group is not None and not hasattr(group, "keys"):
        parent = ".".join(names[:depth])
        return (f"error: config.{parent} is a value ({type(group).__name__}), not a group of "
                f"fields: --config.{parent}=VALUE sets it.")
      container = config if group is None else group
      if name not in container:
        if depth and name in config:
          return f"error: config.{path} does not exist; {name} is top-level: --config.{name}."
        break
      group = container[name]
  return None


def _unknown_field_message(e: Exception, default: str | None = None,
                           args: Sequence[str] = ()) -> str:
  """`default`: the config file the overrides were applied to, not named on the command line;
  `args`: the command line, where the field's whole name is (the error has its last part)."""
  if "has no attribute 'get_config'" in str(e):  # ml_collections' name for the module: no help
    return ("error: the --config file has no get_config(), so it is not a recipe: use one of "
            "configs/cifar_*.py or configs/imagenet_*.py, e.g. "
            "--config configs/cifar_kd.py:res32x4_res8x4.")
  guess = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', str(e))
  if guess:
    return f"error: the config has no field {guess[2]!r}; did you mean {guess[1]!r}?"
  name = re.search(r"'(\w+)'", str(e))
  if name and name[1] in _MDISTILLER_FIELDS:
    return (f"error: the config has no field {name[1]!r}; mdistiller's {name[1]} is "
            f"{_MDISTILLER_FIELDS[name[1]]!r} here (every field: configs/common.py).")
  if name and name[1].lower() in _MDISTILLER_GROUPS:
    return (f"error: the config has no field {name[1]!r}; for mdistiller's {name[1].upper()}, "
            f"{_MDISTILLER_GROUPS[name[1].lower()]}.")
  if not name:
    return f"error: unknown config field ({e})."
  given = [m[1] for a in args for m in [re.match(rf"--config\.((?:\w+\.)*{name[1]})=", a)] if m]
  field = (given or [name[1]])[0]
  if name[1] == "num_classes":
    return (f"error: the config has no field {field!r}. The number of classes is the data's: a "
            "folder's class folders, a tfds dataset's labels.")
  group = field.rpartition(".")[0]
  message = (f"error: {f'config.{group}' if group else 'the config'} has no field "
             f"{name[1]!r}{_fields_of(group, (_config_values(args) or [default])[-1])}.")
  if default:
    message += (f" --config is {os.path.relpath(default)} by default; for a field of another "
                "recipe (e.g. ImageNet's), pass that recipe as --config.")
  return message


def quiet_library_info_logs() -> None:
  """Keeps the console readable: orbax's and tfds' INFO chatter, and JAX's note on the
  platforms it did not find (e.g. 'Unable to initialize backend tpu' on a CPU), are dropped;
  warnings stay. Orbax's errors stay as one line each, without their tracebacks unless
  --verbosity=1: a failed save reaches the trainer, which says what failed and what to do."""
  class _Filter(std_logging.Filter):
    def filter(self, record):
      if "/orbax/" in record.pathname and record.exc_info and not logging.level_debug():
        record.exc_info, record.exc_text = None, None
      return record.levelno >= std_logging.WARNING or not any(
          part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/", "/etils/",
                                               "/jax/_src/xla_bridge.py"))

  logging.get_absl_handler().addFilter(_Filter())


def quiet_unawaited_checkpoint_io() -> None:
  """When one read of an orbax restore fails (an unreadable checkpoint, or an epoch a live run
  deletes), orbax closes its event loop with TensorStore's other reads in flight; each then
  reports "Event loop is closed" as it finishes, or, if it failed too and is garbage-collected,
  asyncio logs "Task (or Future) exception was never retrieved", or Python "Exception ignored
  in" its coroutine. A failed save leaves its other writes so ("_GatheringFuture exception was
  never retrieved"). Each is a traceback on stderr beside the one-line error that
  says what failed; nobody waits for those reads and writes: their reports are dropped."""
  report = sys.unraisablehook

  def filtered(unraisable) -> None:
    error = unraisable.exc_value
    if not ((isinstance(error, RuntimeError) and str(error) == "Event loop is closed")
            or str(error).startswith(_ORBAX_READ_FAILED)):  # a read coroutine left unfinished
      report(unraisable)

  sys.unraisablehook = filtered
  std_logging.getLogger("asyncio").addFilter(_unawaited_tensorstore_io)


_ORBAX_READ_FAILED = "Encountered error while reading array index"  # orbax's wrapping


def _unawaited_tensorstore_io(record: std_logging.LogRecord) -> bool:
  """False (drop) for asyncio's report of a failed TensorStore read or write nobody awaited."""
  error = str(record.exc_info[1]) if record.exc_info else ""
  return not (record.getMessage().startswith(("Task exception was never retrieved",
                                              "Future exception was never retrieved",
                                              "_GatheringFuture exception was never retrieved"))
              and ("tensorstore_spec=" in error or error.startswith(_ORBAX_READ_FAILED)
                   or re.match(r"[A-Z_]+: Error (reading|writing) ", error)))


def redeliver_dropped_interrupts() -> None:
  """A Ctrl-C that lands in a garbage-collector callback or a finalizer (JAX has one) raises
  KeyboardInterrupt where Python only reports it, as unraisable, and goes on: the run carried
  on to its end. Such an interrupt is signalled again, to land in the code that runs next."""
  report = sys.unraisablehook

  def redelivered(unraisable) -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
      # From another thread, a little later: signalled from here, it would land in this hook.
      threading.Timer(0.05, _thread.interrupt_main).start()
    else:
      report(unraisable)

  sys.unraisablehook = redelivered
