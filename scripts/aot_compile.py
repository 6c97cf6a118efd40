"""Compile a stage's training step for a TPU topology on a CPU-only host, and report memory and speed.

python scripts/aot_compile.py --config=configs/FILE.py[:ARG] --topology=v5e:2x4 [--output=FILE.json] [--fit]
    [--frozen_rank=R]

Needs libtpu (pinned in requirements.txt) but no TPU: the devices are libtpu's
compile-only ones. JAX itself runs on the CPU (JAX_PLATFORMS=cpu, the default here).
"""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX is imported: this host's devices stay out of it

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from anita_jax import files  # noqa: E402
from anita_jax.apps import cli  # noqa: E402

# libtpu still starts, for its compile-only devices: on a host without a TPU, describe this host to it as one
# host of its own (the compiled programs are the same), so it starts without its start-up warnings.
cli.quiet_libtpu_without_tpu()

_CONFIG = config_flags.DEFINE_config_file("config", None, "A stage config: configs/FILE.py:ARG.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology CHIP:AxB[xC], CHIP one of v4, v5e, v5p, v6e "
                                "(e.g. v5e:1x1, v5e:2x4, v4:2x2x1, v5p:2x2x1).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the report to this JSON file (atomically).")
_CROSS_CHECK = flags.DEFINE_bool("cross_check", True, "Also compile 1- and 2-layer steps to count FLOPs and bytes "
                                 "(loop bodies are counted once by the compiler); without it FLOPs are analytic "
                                 "and the step time ignores memory traffic.")
_FIT = flags.DEFINE_bool("fit", False, "If the config's micro-batch does not fit, report the largest one that "
                         "does, with the same batch per optimizer step (train.batch_size x train.grad_accum); the "
                         "sizes tried are in the report's `fit_trials`.")
_FROZEN_RANK = flags.DEFINE_integer("frozen_rank", 0, "A stacked stage (init_as=stacked): the summed LoRA rank of "
                                   "the earlier stages' frozen adapters (configs/anita_8b.py: dpo 16, lm 80).")


def main(argv):
  del argv
  from anita_jax.train import aot
  c = cli.single_stage(_CONFIG.value, "--config")
  if _FIT.value:
    c, report, trials = aot.fit_micro_batch(c, _TOPOLOGY.value, _FROZEN_RANK.value)
  if not _FIT.value or _CROSS_CHECK.value:
    report = aot.compile_report(c, _TOPOLOGY.value, cross_check=_CROSS_CHECK.value,
                                frozen_rank=_FROZEN_RANK.value)
  if _FIT.value:
    report["fit_trials"] = trials
  print(json.dumps(report, indent=2, sort_keys=True))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    files.write_json(_OUTPUT.value, report)


if __name__ == "__main__":
  cli.run(main)
