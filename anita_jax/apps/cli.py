"""What every script shares: quiet logs, one `error:` line for user errors, absl plumbing."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging

from anita_jax.errors import Preempted, UserError


def _prefer_cpu_without_accelerators() -> None:
  """On a host without TPU or GPU devices, use the CPU backend directly: with libtpu installed (it is,
  for ahead-of-time compilation) JAX would otherwise try to start a TPU runtime and print errors first."""
  import glob
  if os.environ.get("JAX_PLATFORMS"):
    return
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*") or glob.glob("/dev/nvidia*"):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")


_prefer_cpu_without_accelerators()


def _quiet() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def define_distributed_flags() -> None:
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs "
                      "(default: detected from the environment, as on Cloud TPU pod slices).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def initialize_distributed() -> None:
  """jax.distributed.initialize for multi-process runs: explicit flags, or the environment
  (Cloud TPU pod slices, SLURM, JAX_COORDINATOR_ADDRESS); a no-op on one host."""
  import jax
  f = flags.FLAGS
  if f["coordinator_address"].value:
    jax.distributed.initialize(f["coordinator_address"].value, f["num_processes"].value, f["process_id"].value)
  elif any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")):
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "TPU_WORKER_HOSTNAMES" in os.environ and "," not in hosts and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
      return  # a single-host TPU VM
    jax.distributed.initialize()


def stage_config(config, flag: str):
  """The stage ConfigDict of a --config value; a whole recipe (no ARG) is refused with its stages named."""
  if config is None:
    raise UserError(f"{flag} is required")
  if "stage" not in config:
    raise UserError(f"{flag}: this config holds a whole recipe ({', '.join(sorted(config.keys()))}); "
                    f"choose one stage, e.g. {flag}=FILE.py:{sorted(config.keys())[0]}")
  return config


def _config_file_error(e: flags.Error) -> str:
  """What get_config(ARG) of a --config file raised, as its own one line (ml_collections wraps it in a
  traceback, and absl in "flag --config=...")."""
  wrapper = e.__cause__ or e.__context__  # ml_collections' "Error whilst parsing config file:\n\n<traceback>"
  original = wrapper and (wrapper.__cause__ or wrapper.__context__)
  if original is not None and str(original).strip():
    return str(original).strip().splitlines()[0]
  lines = str(wrapper or "").strip().splitlines()
  return lines[-1] if lines else "get_config failed"


def _unloadable_config(e: OSError) -> str | None:
  """The one line for ml_collections' deferred error of a --config file it could not load, else None."""
  text = str(e)
  if not text.startswith("Configuration is not available"):
    return None
  reason = text.strip().splitlines()[-1].strip().replace("Configuration is not available because of an earlier "
                                                          "failure to load: ", "")
  return f"--config: cannot load the config file ({reason})"


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e).splitlines()[0]
    parsing = re.match(r"flag (--\w+)=(.*?): Error whilst parsing config file:", message)
    if parsing:
      message = f"{parsing.group(1)}={parsing.group(2)}: {_config_file_error(e)}"
    _fail(message)
  except OSError as e:  # a --config.FIELD override reached the config of a --config file that did not load
    message = _unloadable_config(e)
    if message is None:
      raise
    _fail(message)
  except (AttributeError, KeyError) as e:  # ml_collections: --config.FIELD names no field of the config
    text = str(e)
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
    field = words[0] if words else "?"
    bad = next((a.split("=")[0] for a in argv if a.startswith("--config.") and f".{field}." in a.split("=")[0] + "."),
               "--config.FIELD")
    hint = re.search(r'Did you mean "([^"]+)"', text)
    _fail(f"{bad}: unknown config field '{field}'" + (f" (did you mean '{hint.group(1)}'?)" if hint else ""))
  raise AssertionError("unreachable")


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run, with UserError and bad flags reported as one `error:` line (exit 2).

  A traceback is shown only with --verbosity=1 or higher.
  """

  def wrapped(argv):
    _quiet()
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except UserError as e:
      if logging.get_verbosity() >= 1:
        raise
      _fail(str(e))
    except OSError as e:
      message = _unloadable_config(e)
      if message is None:  # not ml_collections' unreadable --config
        raise
      _fail(message)
    except Preempted as e:  # saved at a step boundary: a clean exit, the scheduler restarts the job
      print(str(e), file=sys.stderr, flush=True)
      sys.exit(0)
    except KeyboardInterrupt:
      _fail("interrupted")

  app.run(wrapped, flags_parser=_parse_flags)
