"""scripts/generate.py: text from any model PATH (a training workdir included)."""

from __future__ import annotations

import json

import jax

from anita_jax.convert import loading
from anita_jax.errors import UserError
from anita_jax.infer import generate as G
from anita_jax.train import workdir as W


def main(*, model, prompt, prompts_file, system, chat, max_new_tokens, temperature, top_p, top_k, seed,
         dtype, quant, batch_size) -> None:
  """scripts/generate.py: prints the generated text, or one JSON line per row of a prompts file."""
  if (prompt is None) == (prompts_file is None):
    raise UserError("give exactly one of --prompt and --prompts_file")
  if prompt is not None and not prompt.strip():
    raise UserError("--prompt is empty")
  rows = G.read_prompts_file(prompts_file) if prompts_file else [{"prompt": prompt, "system": system}]
  path = model or loading.embedded_default_path()
  if dtype is None and not W.is_workdir(path):  # a workdir has its own dtype
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  # Unrolled layers for a dense model, scanned for a quantized one (loading.decode_scan).
  net, params, tokenizer, config = W.load_model(path, dtype=dtype, quant=quant, scan_layers=None)
  defaults = G.sampling_defaults(path)
  sampling = G.SamplingSpec(
      max_new_tokens=max_new_tokens if max_new_tokens is not None else defaults.get("max_new_tokens", 256),
      temperature=temperature if temperature is not None else defaults.get("temperature", 0.0),
      top_p=top_p if top_p is not None else defaults.get("top_p", 1.0),
      top_k=top_k if top_k is not None else defaults.get("top_k", 0))
  generator = G.Generator(net, params, tokenizer, loading.stop_token_ids(tokenizer, config),
                        config.max_position_embeddings, batch_size=batch_size)
  ids = generator.generate_ids(
      [generator.encode(r["prompt"], r.get("system") or system, chat) for r in rows], sampling, seed)
  texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
  if prompts_file is None:
    print(texts[0])
  else:
    for row, text in zip(rows, texts):
      print(json.dumps({"prompt": row["prompt"], "text": text}, ensure_ascii=False))
