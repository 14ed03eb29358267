"""Shared plumbing of the absl programs under launch/: the --config and
--workdir flags, config checking (`run`), the CPU allocator setting, and
multi-host start-up."""

from __future__ import annotations

import difflib
import logging as logging_std
import os
import platform
import re
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from hybridna_jax import config as config_lib
from hybridna_jax import paths
from hybridna_jax.train import startup_signal

FLAGS = flags.FLAGS


def define_flags(
  *, workdir_required: bool = True, config_required: bool = False, distributed: bool = True
) -> None:
  """--config=<configs/file.py>[:variant] (with --config.x.y=... overrides),
  --workdir, and, for programs that run on several processes
  (`distributed`, which then call `initialize_distributed`), the multi-host
  flags."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/demo.py[:variant]; override fields with --config.train.steps=...",
    lock_config=True,
  )
  if config_required:
    flags.mark_flag_as_required("config")
  flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, outputs).", required=workdir_required
  )
  if not distributed:
    return
  flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' does when a "
    "coordinator is given or a cluster (SLURM, TPU pod) is detected.",
  )
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


# Errors that mean a user mistake (a bad config value, input file or run
# directory): the program ends with their one-line message, no traceback.
# Every project error type (ConfigError, StoreError, FastaFormatError,
# TaskFormatError, VariantFormatError, CheckpointMismatchError, ...) is a
# ValueError. HYBRIDNA_TRACEBACK=1 shows the traceback anyway.
USER_ERRORS = (ValueError, KeyError, OSError)
TRACEBACK_ENV = "HYBRIDNA_TRACEBACK"


def run(main, *, huge_pages: bool = True, record_sigterm: bool = False) -> None:
  """app.run(main), with the job config checked once the flags are parsed:
  an unknown or malformed field, in the config file or in a --config.x.y
  override, ends the program with one line naming it (exit status 1), and
  so does a user error (`USER_ERRORS`) raised by `main`. On a CPU-only host
  the program first restarts itself once with huge pages for malloc
  (`restart_with_huge_pages`), unless `huge_pages` is False.

  `record_sigterm` (training programs): a SIGTERM from the restart on, while
  the flags and config are read and the program starts up, is recorded
  (`startup_signal.catch`) and honoured by the training loop with a
  checkpoint, instead of killing the process. Not before the restart: exec
  would drop a recorded signal."""
  if huge_pages:
    restart_with_huge_pages()
  if record_sigterm:
    startup_signal.catch()
  app.run(one_line_errors(_flags_only(main)), flags_parser=_parse_flags)


def _flags_only(main):
  """`main` refusing words that are not flags (e.g. the second value of
  `--labels HepG2 K562`, which would be dropped) as a usage error."""

  def checked(argv):
    if len(argv) > 1:
      raise app.UsageError(
        f"unexpected arguments {argv[1:]}: every input is a flag, --name=value "
        "(repeat a flag for several values)."
      )
    return main(argv)

  return checked


# glibc's malloc on transparent huge pages: XLA:CPU maps a training step's
# temporaries (2.46 GB for the demo's) afresh at every step, and in 4 KiB
# pages that was ~600,000 page faults a step; with this setting the demo's
# training ran 1.3x faster at the same resident memory (benchmarks/RESULTS.md,
# "The allocator"). The same value as scripts/cpu_allocator.sh.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_ENV = "HYBRIDNA_HUGE_PAGES"  # "0": never restart
_ACCELERATOR_DEVICES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0")


def huge_pages_restart_wanted(
  environ, libc: tuple[str, str], thp_mode: str | None, accelerator: bool
) -> bool:
  """Whether to restart with `HUGE_PAGES_TUNABLE`: not when GLIBC_TUNABLES is
  already set (the user's choice, or this is the restarted process), when
  HYBRIDNA_HUGE_PAGES=0, on a GPU/TPU host (XLA keeps its buffers on the
  device there), or where the tunable does nothing: a libc other than glibc
  >= 2.35 (`platform.libc_ver()`), or THP mode "never" or unknown
  (`transparent_huge_pages_mode`)."""
  if "GLIBC_TUNABLES" in environ or environ.get(HUGE_PAGES_ENV, "1") == "0" or accelerator:
    return False
  name, version = libc
  try:
    major_minor = tuple(int(v) for v in version.split(".")[:2])
  except ValueError:
    return False
  return name == "glibc" and major_minor >= (2, 35) and thp_mode in ("always", "madvise")


def transparent_huge_pages_mode() -> str | None:
  """The kernel's THP mode ("always", "madvise", "never"), None if unknown."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return re.search(r"\[(\w+)\]", f.read()).group(1)
  except (OSError, AttributeError):
    return None


def restart_with_huge_pages() -> None:
  """Re-executes this program (same pid, arguments and interpreter options)
  with glibc's malloc on huge pages when `huge_pages_restart_wanted` says so;
  returns otherwise. The allocator reads GLIBC_TUNABLES only at process start,
  hence the restart."""
  accelerator = any(os.path.exists(path) for path in _ACCELERATOR_DEVICES)
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    accelerator = False
  if not huge_pages_restart_wanted(
    os.environ, platform.libc_ver(), transparent_huge_pages_mode(), accelerator
  ):
    return
  if sys.argv[0] in ("-", "", "-c"):
    return  # a program from stdin (read already) or -c: nothing to re-run
  sys.stdout.flush()
  sys.stderr.flush()
  env = dict(os.environ, GLIBC_TUNABLES=HUGE_PAGES_TUNABLE)
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def one_line_errors(main):
  """`main` with a user error (`USER_ERRORS`) turned into one line on
  stderr, "<program>: <message>", and exit status 1."""

  def guarded(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        raise
      sys.exit(f"{os.path.basename(sys.argv[0])}: error: {error_line(e)}")
    except ImportError as e:
      # A gs:// path without the optional packages (paths.py) is set-up, not a bug.
      if not any(name in str(e) for name in ("gcsfs", "google.cloud")):
        raise
      sys.exit(
        f"{os.path.basename(sys.argv[0])}: error: gs:// paths need "
        f"`pip install gcsfs google-cloud-storage` ({error_line(e)})."
      )

  return guarded


def error_line(error: BaseException, limit: int = 2000) -> str:
  """The error's message on one line (a KeyError without its quotes)."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else error
  line = " ".join(str(text).split()) or type(error).__name__
  if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
    line = f"{type(error).__name__}: {line}"
  return line if len(line) <= limit else line[:limit] + " ..."


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    # A ConfigError of the config file (e.g. an unknown :variant) reaches
    # here wrapped in a traceback; its own line says it all.
    origin = _config_error(e)
    if origin is not None:
      sys.exit(str(origin))
    # Otherwise, as absl's app.parse_flags_with_usage.
    sys.stderr.write(
      f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.\n"
    )
    sys.exit(1)
  except OSError as e:  # ml_collections: the file did not load (and an override needs it)
    if "config" not in FLAGS:
      raise
    sys.exit(_config_load_error(e, argv))
  except (AttributeError, KeyError):
    # ml_collections: an override naming no field fails with a bare key.
    message = _unknown_override(argv)
    if message is None:
      raise
    sys.exit(message)
  config = FLAGS["config"].value if "config" in FLAGS else None
  if config is not None:
    try:
      config_lib.validate(config)
    except ValueError as e:  # ConfigError, or a section's own check
      sys.exit(str(e))
    except OSError as e:  # ml_collections: the file did not load
      sys.exit(_config_load_error(e, argv))
  return rest


def _config_load_error(error: OSError, argv: list[str]) -> str:
  """One line for a --config file ml_collections could not load."""
  cause = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
  given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  return (
    f"--config={given[-1] if given else ''}: cannot load it ({cause}); give the "
    "path of a config file, e.g. configs/demo.py from the repository's root."
  )


def _config_error(error: BaseException) -> config_lib.ConfigError | None:
  """The innermost ConfigError `error` was raised from, if any."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, config_lib.ConfigError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def _unknown_override(argv: list[str]) -> str | None:
  """The message for the first --config.<path>=... override of `argv` whose
  path is not in the config (None when every path is)."""
  spec = None
  for i, arg in enumerate(argv):
    if re.fullmatch(r"-{1,2}config", arg) and i + 1 < len(argv):
      spec = argv[i + 1]
    elif m := re.fullmatch(r"-{1,2}config=(.*)", arg):
      spec = m.group(1)
  if spec is None:
    return None
  try:
    config = config_lib.load_config(spec, check=False)
  except Exception:  # pylint: disable=broad-except
    return None  # the original error says more
  for arg in argv:
    m = re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg)
    if not m:
      continue
    node, path = config, "config"
    for key in m.group(1).split("."):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        names = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(key, names, 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
          f"--config.{m.group(1)}: {path} has no field {key!r}{hint}; its fields: "
          f"{', '.join(names)}."
        )
      node, path = node[key], f"{path}.{key}"
  return None


class _LibraryInfoFilter(logging_std.Filter):
  """Drops INFO records from chatty libraries (Orbax logs several lines per
  checkpoint); their warnings and errors still show."""

  _QUIET = ("orbax", "grain", "jax/_src")

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno > logging_std.INFO or not any(
      part in record.pathname for part in self._QUIET
    )


def named_checkpoint(checkpoint: str | None, workdir: str | None, which: str, what: str):
  """The step a launcher restores (`restore.CheckpointRef`): --checkpoint,
  else --workdir, resolved once, so that the step named and recorded is the
  one restored. One of the two flags is needed; `what` is what the run is
  for, in the error ("evaluate", ...)."""
  if checkpoint is None and workdir is None:
    raise app.UsageError(f"pass --workdir (the run to {what}) or --checkpoint.")
  from hybridna_jax import restore  # pylint: disable=g-import-not-at-top

  return restore.find_checkpoint(checkpoint or workdir, which)


def local_output(path: str, flag: str) -> str:
  """`path` for an output flag whose writers need a local file: a file://
  URL (e.g. the default under a file:// --workdir) becomes its local path;
  another URL (under a gs:// --workdir) is refused in one line naming `flag`."""
  if paths.scheme(path) == "file":
    return paths.local_file_path(path)
  if paths.is_url(path):
    raise ValueError(
      f"{flag}={path}: this output is written to local files; pass a local path in {flag}."
    )
  return path


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def _cluster_detected() -> bool:
  env = os.environ
  return (
    int(env.get("SLURM_NTASKS", "1")) > 1
    or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    or "JAX_COORDINATOR_ADDRESS" in env
  )


def initialize_distributed() -> None:
  """Multi-host start-up; a no-op for single-process runs."""
  mode = FLAGS.distributed
  explicit = FLAGS.coordinator_address is not None
  if mode == "off" or (mode == "auto" and not explicit and not _cluster_detected()):
    return
  # Cross-process collectives of the CPU client (tests, debugging) go
  # through gloo; GPU/TPU clients are unaffected. (Asking for the backend
  # here would initialise it, which must wait for initialize().)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    kwargs = dict(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  jax.distributed.initialize(**kwargs)
  logging.info(
    "process %d/%d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
