"""Generate text with a model PATH: HF directory, .gguf file, hub id (default: the embedded SmolLM2)."""

from absl import flags

from anita_jax.apps import cli
from anita_jax.apps import commands

_MODEL, _DTYPE, _QUANT = cli.define_model_flags()
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt (or use --prompts_file).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, 'JSONL rows {"prompt", "system"?}; prints JSON lines.')
_SYSTEM = flags.DEFINE_string("system", None, "System prompt (chat mode).")
_CHAT = flags.DEFINE_bool("chat", True, "Apply the tokenizer's chat template with a generation prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate (default: generation config, else 256).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 = greedy (default: generation config, else greedy).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass (default: generation config, else 1).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k filter, 0 = off (default: generation config, else 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per batch with --prompts_file.")


def main(argv):
  del argv
  commands.generate(
      model=_MODEL.value, prompt=_PROMPT.value, prompts_file=_PROMPTS_FILE.value, system=_SYSTEM.value,
      chat=_CHAT.value, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
      top_k=_TOP_K.value, seed=_SEED.value, dtype=_DTYPE.value, quant=_QUANT.value,
      batch_size=_BATCH.value)


if __name__ == "__main__":
  cli.run(main)
