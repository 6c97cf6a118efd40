"""Prefill and greedy-decode tokens/s of our generator vs transformers, same model, same run.

python scripts/bench_generate.py [--model=PATH] [--prompt_tokens=128] [--new_tokens=128] [--batch=1]
Decode rate = (new_tokens - 1) / (time(new_tokens) - time(1)): prefill is timed on its own.
"""

import json
import os
import time

from absl import flags

from anita_jax.apps import cli

_MODEL = flags.DEFINE_string("model", None, "Model PATH (default: the embedded SmolLM2-135M-Instruct).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 128, "Prompt length in tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens to generate (no early stop).")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts per batch.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype, both sides.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the best is reported.")


def best_time(fn, repeats):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  import numpy as np
  import torch
  import transformers

  from anita_jax.infer import generate
  from anita_jax.convert import loading
  path = _MODEL.value or loading.embedded_default_path()
  b, p, n, r = _BATCH.value, _PROMPT_TOKENS.value, _NEW_TOKENS.value, _REPEATS.value
  net, params, tokenizer, config = loading.load_pretrained(path, dtype=_DTYPE.value)
  ids = np.random.RandomState(0).randint(100, config.vocab_size, (b, p)).tolist()
  # No stop ids: every run generates exactly the requested number of tokens.
  ours = generate.Generator(net, params, tokenizer, [], config.max_position_embeddings, batch_size=b)
  run = lambda k: ours.generate_ids(ids, generate.SamplingSpec(max_new_tokens=k))
  jax_prefill, jax_full = best_time(lambda: run(1), r), best_time(lambda: run(n), r)

  if os.path.isfile(path):
    directory, kwargs = os.path.dirname(path), {"gguf_file": os.path.basename(path)}
  else:
    directory, kwargs = path, {}
  ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, _DTYPE.value), **kwargs).eval()
  tokens = torch.tensor(ids)

  def hf(k):
    with torch.no_grad():
      ref.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=k, min_new_tokens=k,
                   do_sample=False, pad_token_id=0)
  hf_prefill, hf_full = best_time(lambda: hf(1), r), best_time(lambda: hf(n), r)

  row = lambda prefill, full: {"prefill_tokens_per_s": round(b * p / prefill, 1),
                               "decode_tokens_per_s": round(b * (n - 1) / (full - prefill), 1)}
  result = {"model": path, "batch": b, "prompt_tokens": p, "new_tokens": n, "dtype": _DTYPE.value,
            "torch_threads": torch.get_num_threads(), "anita_jax": row(jax_prefill, jax_full),
            "transformers": row(hf_prefill, hf_full)}
  result["decode_speedup"] = round(result["anita_jax"]["decode_tokens_per_s"]
                                   / result["transformers"]["decode_tokens_per_s"], 2)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  cli.run(main)
