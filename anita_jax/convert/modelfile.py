"""The Ollama `Modelfile` beside an exported GGUF file.

FROM the file, the chat TEMPLATE in Ollama's Go template syntax (Llama 3 and ChatML: the formats
whose Hugging Face template the tokenizer holds), the stop tokens, SYSTEM (the prompt given, or the
default system prompt the chat template inserts by itself, as SmolLM2's does) and the sampling defaults
of the generation config (`temperature`, `top_p`, `top_k`, `num_predict`, `repeat_penalty`).

Ollama puts system messages into `.System` and also leaves them in `.Messages`, so the templates
render `.System` once and skip system entries of `.Messages`.
"""

from __future__ import annotations

import json
import os

from anita_jax import files
from anita_jax.convert import loading
from anita_jax.convert.generation import sampling
from anita_jax.errors import UserError
from anita_jax.model.config import ModelConfig

LLAMA3_TEMPLATE = """\
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}
{{- if not $last }}<|eot_id|>
{{- end }}
{{- end }}
{{- end }}"""

CHATML_TEMPLATE = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
{{ end }}
{{- else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}
{{- if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- end }}"""

# kind -> (Go template, the text that opens a system turn and the one that closes it, extra stops).
FORMATS = {
    "llama3": (LLAMA3_TEMPLATE, ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "chatml": (CHATML_TEMPLATE, ("<|im_start|>system\n", "<|im_end|>"), ("<|im_start|>", "<|im_end|>")),
}
_PROBE = "anita-probe-user-turn"


def chat_format(tokenizer) -> str | None:
  """'llama3' or 'chatml' from the tokenizer's chat template; None for another or no template."""
  template = getattr(tokenizer, "chat_template", None) or ""
  template = template.get("default", "") if isinstance(template, dict) else str(template)
  if "<|start_header_id|>" in template and "<|eot_id|>" in template:
    return "llama3"
  if "<|im_start|>" in template and "<|im_end|>" in template:
    return "chatml"
  return None


def default_system(tokenizer, kind: str | None) -> str | None:
  """The system prompt the chat template inserts when a conversation has none (None if it inserts none)."""
  if kind is None:
    return None
  try:
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                         add_generation_prompt=True)
  except Exception:  # noqa: BLE001 - a template that cannot render has no default to find
    return None
  start, end = FORMATS[kind][1]
  i = text.find(start)
  if i < 0 or i > text.find(_PROBE):
    return None
  j = text.find(end, i + len(start))
  return text[i + len(start):j] if j >= 0 else None


def sampling_parameters(generation: dict | None) -> list[tuple[str, float | int]]:
  """Ollama PARAMETERs of a transformers generation config: greedy (temperature 0) unless `do_sample` is
  true, as transformers decodes; no config, no PARAMETERs (Ollama's own defaults)."""
  if generation is None:
    return []
  g = dict(generation)
  # transformers' values where the config is silent (Ollama's differ: 0.8, 0.9, 40); top_k 0 = off.
  settings = sampling(g)
  if g.get("do_sample"):
    out: list[tuple[str, float | int]] = [(k, settings[k]) for k in ("temperature", "top_p", "top_k")]
  else:
    out = [("temperature", 0.0)]  # transformers' greedy decoding
  if settings["max_new_tokens"]:
    out.append(("num_predict", int(settings["max_new_tokens"])))
  if g.get("repetition_penalty") not in (None, 1.0):
    out.append(("repeat_penalty", float(g["repetition_penalty"])))
  return out


def _quoted(field: str, text: str) -> str:
  if '"""' in text:
    raise UserError(f'Modelfile {field}: the text holds """, which a Modelfile cannot quote')
  return f'{field} """{text}"""'


def stop_tokens(tokenizer, config: ModelConfig, kind: str | None) -> list[str]:
  """The texts generation stops on: the format's turn markers and every end-of-turn/sequence token."""
  stops = list(FORMATS[kind][2]) if kind else []
  for i in loading.stop_token_ids(tokenizer, config):
    token = tokenizer.convert_ids_to_tokens(int(i))
    if token and token not in stops:
      stops.append(token)
  return stops


def modelfile_text(gguf_file: str, tokenizer, config: ModelConfig, *, system: str | None = None,
                   generation: dict | None = None, relative_to: str | None = None) -> str:
  """The Modelfile for `gguf_file`; FROM is relative to the directory `relative_to` when the file is in it."""
  source = files.absolute(gguf_file)
  if relative_to and os.path.dirname(source) == files.absolute(relative_to):
    source = "./" + os.path.basename(source)
  kind = chat_format(tokenizer)
  lines = [f"FROM {source}"]
  if kind:
    lines.append(_quoted("TEMPLATE", FORMATS[kind][0]))
  system = system if system is not None else default_system(tokenizer, kind)
  if system:
    lines.append(_quoted("SYSTEM", system))
  lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stop_tokens(tokenizer, config, kind)]
  lines += [f"PARAMETER {k} {v:g}" if isinstance(v, float) else f"PARAMETER {k} {v}"
            for k, v in sampling_parameters(generation)]
  return "\n".join(lines) + "\n"


def write_modelfile(path: str, gguf_file: str, tokenizer, config: ModelConfig, *, system: str | None = None,
                    generation: dict | None = None) -> None:
  """Writes the Modelfile `path` (atomically) for `gguf_file` (see `modelfile_text`).

  system: SYSTEM (default: the chat template's own default system prompt, if any).
  generation: a transformers generation config dict (sampling defaults); None writes none.
  """
  files.write_text(path, modelfile_text(gguf_file, tokenizer, config, system=system, generation=generation,
                                        relative_to=os.path.dirname(files.absolute(path))))
