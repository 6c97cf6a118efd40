"""What every script shares: quiet logs, one `error:` line for user errors, absl plumbing."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging

from anita_jax.errors import Preempted, UserError


def _tpu_chips() -> int | None:
  """TPU chips on this host as JAX's own start-up counts them (`cloud_tpu_init`: a PCI scan); None when libtpu
  is not installed, or this JAX no longer offers the count."""
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    return None
  try:
    from jax._src import hardware_utils
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except (ImportError, AttributeError, TypeError, IndexError):
    return None


def quiet_libtpu_without_tpu(environ=os.environ, tpu_chips: Callable[[], int | None] = _tpu_chips) -> None:
  """libtpu (installed for compile-only TPU use, `scripts/aot_compile.py`) starts on any host JAX_PLATFORMS
  lets it and, with no TPU to describe, prints a "could not determine TPU accelerator type" warning and an
  INVALID_ARGUMENT error for its placeholder worker hostname. Where JAX's own count finds no TPU chip, it is
  told this host is one host of its own (TPU_WORKER_HOSTNAMES, TPU_HOST_BOUNDS, unless set): it then starts
  quietly (compile-only devices) or fails quietly (JAX goes on to its other backends); its real errors still
  show. A TPU host keeps its metadata server's answers (a pod's worker list)."""
  if tpu_chips() == 0:
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")


def choose_backend(environ=os.environ, tpu_chips: Callable[[], int | None] = _tpu_chips) -> str | None:
  """The JAX_PLATFORMS scripts run under: the environment's when set, else None, JAX's own discovery (its
  plugins: CUDA, ROCm, TPU, ..., then the CPU), so any accelerator JAX can drive is used. Device files are not
  looked at: JAX knows its plugins, this module does not. Without JAX_PLATFORMS libtpu starts too, quietly
  (`quiet_libtpu_without_tpu`)."""
  chosen = environ.get("JAX_PLATFORMS") or None
  if chosen is None:
    quiet_libtpu_without_tpu(environ, tpu_chips)
  return chosen


choose_backend()


def _quiet() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def define_model_flags():
  """--model, --dtype and --quant, as the scripts that run any model PATH take them: (model, dtype, quant)."""
  return (flags.DEFINE_string("model", None, "Model PATH (default: the embedded SmolLM2-135M-Instruct GGUF)."),
          flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: a workdir's own; "
                            "else float32 on CPU, bfloat16 on accelerators)."),
          flags.DEFINE_enum("quant", None, ["none", "nf4", "int4"], "Frozen projection weights (default: a "
                            "workdir's own; else none)."))


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
  elif (any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID"))
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")):
    # One TPU worker host (a single-host TPU VM, or `quiet_libtpu_without_tpu`'s own "localhost") is no pod.
    # JAX reads JAX_COORDINATOR_ADDRESS itself but no process count or index: given as flags, they go with it.
    jax.distributed.initialize(num_processes=f["num_processes"].value, process_id=f["process_id"].value)


def single_stage(config, flag: str):
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
