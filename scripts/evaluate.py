"""Run lm-evaluation-harness tasks with this project's JAX model as the backend.

python scripts/evaluate.py --model=PATH --tasks=T1,T2 [--num_fewshot=N] [--limit=N] [--include_path=DIR]
  [--batch_size=N] [--apply_chat_template] [--system=TEXT] [--dtype=...] [--quant=...] --output=FILE.json
FILE.json holds lm-eval's results per task and metric, the task configs, and per-sample log-likelihoods.
"""

from absl import flags

from anita_jax.apps import cli
from anita_jax.apps import commands

_MODEL, _DTYPE, _QUANT = cli.define_model_flags()
_TASKS = flags.DEFINE_list("tasks", None, "Comma-separated lm-eval task, group or tag names (or YAML files).")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: each task's own).")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many documents per task (for quick checks).")
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "A directory of extra task YAML files.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
_CHAT = flags.DEFINE_bool("apply_chat_template", False, "Wrap prompts in the tokenizer's chat template.")
_SYSTEM = flags.DEFINE_string("system", None, "System instruction (lm-eval's system_instruction).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Context window (default: max_position_embeddings).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap_iters", 100000, "lm-eval's bootstrap iterations for stderrs "
                                  "(0 = none).")
_OUTPUT = flags.DEFINE_string("output", None, "The JSON file to write.")


def main(argv):
  del argv
  commands.evaluate(
      model=_MODEL.value, tasks=_TASKS.value or [], output=_OUTPUT.value, num_fewshot=_NUM_FEWSHOT.value,
      limit=_LIMIT.value, include_path=_INCLUDE_PATH.value, batch_size=_BATCH.value,
      apply_chat_template=_CHAT.value, system=_SYSTEM.value, dtype=_DTYPE.value, quant=_QUANT.value,
      max_length=_MAX_LENGTH.value, bootstrap_iters=_BOOTSTRAP.value)


if __name__ == "__main__":
  cli.run(main)
