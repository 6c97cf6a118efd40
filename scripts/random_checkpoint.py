"""A Hugging Face model directory of a preset's architecture with random bf16 weights, sharded as on the hub.

python scripts/random_checkpoint.py --preset=llama3-8b --output=DIR [--seed=0] [--max_shard_size=5GB]

For checking a host (memory, time) before downloading real weights: config.json, generation_config.json,
model-0000k-of-0000n.safetensors + model.safetensors.index.json, and a tokenizer of the preset's vocabulary
(llama3*: the real Llama-3 tokenizer with Meta's chat template; smollm2*: SmolLM2-135M-Instruct's). Streamed
(about one shard in host memory) and atomic (a temporary directory renamed into place).
"""

import time

from absl import flags

from anita_jax.apps import cli

_PRESET = flags.DEFINE_string("preset", None, "Architecture: a name in anita_jax.model.config.PRESETS.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The directory to write (replaced atomically).", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest shard, e.g. 5GB or 500MB (as transformers).")


def main(argv):
  del argv
  from anita_jax.convert import random_checkpoint as R
  start = time.perf_counter()
  max_shard_bytes = R.parse_size(_MAX_SHARD_SIZE.value)
  config = R.preset_config(_PRESET.value)
  tokenizer = R.preset_tokenizer(_PRESET.value, config)
  print(f"{_PRESET.value}: {config.num_params / 1e9:.2f}B parameters, {2 * config.num_params / 1e9:.2f} GB in bf16 "
        f"-> {_OUTPUT.value}", flush=True)
  written = R.write_random_checkpoint(_OUTPUT.value, config, tokenizer, seed=_SEED.value,
                                      max_shard_bytes=max_shard_bytes, progress=lambda line: print(line, flush=True))
  for name, size in written.items():
    print(f"  {size:>14,d}  {name}")
  print(f"wrote {_OUTPUT.value}: {sum(written.values()) / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  cli.run(main)
