"""GGUF export of a model: file size and held-out Italian perplexity per type, against the source model.

python scripts/bench_gguf.py --model=runs/demo/lm [--types=f16,q8_0,q4_0] [--workdir=/tmp/bench_gguf]
Each type is written with scripts/export_gguf.py's code path (the model merged once), read back by our GGUF
importer, and scored on the demo's held-out Italian text (the report's perplexity: exp of the mean token NLL,
texts cut to 256 tokens). With llama-cpp-python installed, llama.cpp scores the same token ids too, in a child
process (anita_jax.infer.llama_cpp).
"""

import json
import math
import os
import time

from absl import flags

from anita_jax.apps import cli
from anita_jax.infer import llama_cpp

_MODEL = flags.DEFINE_string("model", None, "Model PATH (a training workdir included).", required=True)
_TYPES = flags.DEFINE_list("types", ["f16", "q8_0", "q4_0"], "GGUF types to write and score.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_gguf", "Where the GGUF files go.")


def llama_cpp_perplexity(path: str, token_rows: list[list[int]]) -> float | None:
  """exp(mean NLL) of every token after the first of each row, from llama.cpp's own logits (computed in a child
  process: llama.cpp beside JAX in one process can crash); None without llama-cpp-python."""
  if not llama_cpp.available():
    return None
  rows = llama_cpp.logprobs(path, token_rows, n_ctx=512)
  return math.exp(-sum(map(sum, rows)) / sum(map(len, rows)))


def main(argv):
  del argv
  from anita_jax.apps import recipe, report
  from anita_jax.data import encode, rows
  from anita_jax.train import publish
  from anita_jax.train import workdir as W
  texts = os.path.join(recipe.DEMO_DATA, report.TEXTS_FILE)
  model, params, tokenizer, _ = W.load_model(W.model_path(_MODEL.value), scan_layers=False)
  source = report.perplexity(model, params, tokenizer, texts)
  print(json.dumps({"model": _MODEL.value, "perplexity": round(source, 3)}), flush=True)
  examples, _ = encode.encode_dataset(rows.load_rows(texts, fmt="text"), tokenizer, max_length=256, fmt="text")
  token_rows = [list(map(int, ex.input_ids)) for ex in examples]
  os.makedirs(_WORKDIR.value, exist_ok=True)
  outputs = {t: os.path.join(_WORKDIR.value, f"model-{t}.gguf") for t in _TYPES.value}
  start = time.perf_counter()
  publish.export_gguf(_MODEL.value, outputs)
  print(json.dumps({"export_seconds": round(time.perf_counter() - start, 1)}), flush=True)
  for type_, path in outputs.items():
    model, params, tokenizer, _ = W.load_model(path, dtype="float32", quant="none", scan_layers=False)
    ppl = report.perplexity(model, params, tokenizer, texts)
    print(json.dumps({"type": type_, "mib": round(os.path.getsize(path) / 2 ** 20, 1), "perplexity": round(ppl, 3),
                      "vs_source": round(ppl / source, 4),
                      "llama_cpp_perplexity": llama_cpp_perplexity(path, token_rows)}), flush=True)


if __name__ == "__main__":
  cli.run(main)
