"""A model's generation settings: its `generation_config.json`, and the sampling transformers decodes with.

`generation_config(path)` reads the file of a model PATH that is not a training workdir (for any PATH,
workdirs included: `train.workdir.generation_config`): an HF directory, local or on gs:// (read through
`files`, one object, never a copy of the model), a hub id (the file alone, through huggingface_hub's cache
as `loading` fetches model files), a PEFT adapter directory (its base model's: PEFT decodes with the base's
generation config) and a .gguf file (none: GGUF holds no sampling settings). `sampling(generation)` is what
transformers decodes with under that config, the defaults `scripts/generate.py` starts from.
"""

from __future__ import annotations

import json
import os

from anita_jax import files
from anita_jax.errors import UserError

FILE = "generation_config.json"
# transformers' GenerationConfig defaults for the fields a config leaves out when it samples.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


def _read_json(path: str) -> dict:
  try:
    value = json.loads(files.read_bytes(path))
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise UserError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(value, dict):
    raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _from_hub(repo: str) -> dict | None:
  """The hub model's generation config, from huggingface_hub's cache when it is there (offline too)."""
  try:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
  except ImportError:
    return None
  try:
    local = hf_hub_download(repo, FILE)
  except EntryNotFoundError:  # the repo has no such file, or offline with none cached
    return None
  except Exception as e:  # noqa: BLE001 - any other hub failure is the user's missing network or id
    raise UserError(f"{repo}: not a local path, and the hub download of {FILE} failed ({type(e).__name__})") from None
  return _read_json(local)


def generation_config(path: str) -> dict | None:
  """The generation config (a dict of generation_config.json's fields) of a model PATH other than a training
  workdir; None when it has none (transformers' defaults: greedy)."""
  if path.endswith(".gguf"):
    return None
  if files.is_remote(path) or os.path.exists(path):
    adapter = os.path.join(path, "adapter_config.json")
    if files.isfile(adapter):
      base = _read_json(adapter).get("base_model_name_or_path")
      return generation_config(base) if base else None  # no base named: the model itself cannot load
    file = os.path.join(path, FILE)
    return _read_json(file) if files.isfile(file) else None
  if files.hub_id(path) is not None:
    return _from_hub(path)
  raise UserError(f"{path}: no such file or directory")


def sampling(generation: dict | None) -> dict:
  """{temperature, top_p, top_k, max_new_tokens} transformers decodes with under `generation`: greedy
  (temperature 0, no filters) unless it sets `do_sample`; max_new_tokens None where it sets none."""
  g = generation or {}
  out = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": g.get("max_new_tokens") or None}
  if g.get("do_sample"):
    values = {k: default if g.get(k) is None else g[k] for k, default in SAMPLING_DEFAULTS.items()}
    out.update(temperature=float(values["temperature"]), top_p=float(values["top_p"]), top_k=int(values["top_k"]))
  return out
