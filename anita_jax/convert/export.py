"""Writing a trained model out: a transformers directory, a PEFT adapter, a model card.

Every writer builds its output in a sibling directory `OUT.tmp-<pid>` and moves
it into place only once all files are written and synced (`atomic_dir`), so an
interrupted export never leaves a half-written OUT. A `.tmp-<pid>` left by a
killed process may hold some files, but `write_hf_model` writes `config.json`
last, so transformers refuses an unfinished one rather than loading part of a model.

Weights stream from `convert.hf.to_hf_tensors` into safetensors one shard at a
time: host memory beyond the parameters themselves stays under one shard (plus
one tensor larger than a shard, which gets a shard of its own). The shard plan
and the model card's front matter come from `huggingface_hub`, as transformers
makes them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import huggingface_hub
import ml_dtypes
import numpy as np
from flax import traverse_util

from anita_jax import files
from anita_jax.model import quant as Q
from anita_jax.model.config import ModelConfig
from anita_jax.convert import peft
from anita_jax.convert.hf import hf_shapes, to_hf_tensors
from anita_jax.errors import UserError
from anita_jax.model.config import LoraSpec

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
SHARD_PATTERN = "model{suffix}.safetensors"  # huggingface_hub fills in "" or "-0000k-of-0000n"
INDEX_NAME = "model.safetensors.index.json"


# Atomic directories ------------------------------------------------------------------------------

def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def _remove_stale(out_dir: str) -> None:
  """Deletes `out_dir.tmp-PID` / `out_dir.old-PID` left by killed exports (PID no longer running)."""
  parent, name = os.path.split(out_dir)
  for entry in os.listdir(parent) if os.path.isdir(parent) else ():
    prefix, _, pid = entry.rpartition("-")
    if prefix not in (f"{name}.tmp", f"{name}.old") or not pid.isdigit():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      _remove(os.path.join(parent, entry))
    except PermissionError:  # alive, another user's
      pass


@contextlib.contextmanager
def atomic_dir(out_dir: str) -> Iterator[str]:
  """Yields a fresh temporary directory that replaces `out_dir` when the block succeeds.

  On an exception the temporary directory is deleted and `out_dir` (if it
  existed) is left untouched. On success an existing `out_dir` is moved aside,
  the new one renamed into place, and only then the old one deleted.

  A URL `out_dir` (gs://...): the directory is written locally, then uploaded file by file with its
  config.json files last (`files.upload_dir`); an object store has no directory to rename.
  """
  if files.is_remote(out_dir):
    with tempfile.TemporaryDirectory(prefix="anita-export-") as tmp:
      yield tmp
      files.upload_dir(tmp, out_dir)
    return
  out_dir = os.path.abspath(out_dir)
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"{out_dir}: exists and is not a directory")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  _remove_stale(out_dir)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  _remove(tmp)
  os.makedirs(tmp)
  try:
    yield tmp
    files.fsync_tree(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.lexists(out_dir):
    old = f"{out_dir}.old-{os.getpid()}"
    _remove(old)
    os.replace(out_dir, old)
  try:
    os.replace(tmp, out_dir)
  except BaseException:
    if old is not None:
      os.replace(old, out_dir)
    raise
  files.fsync_file(parent)
  if old is not None:
    _remove(old)


@contextlib.contextmanager
def _target_dir(out_dir: str, atomic: bool) -> Iterator[str]:
  if atomic:
    with atomic_dir(out_dir) as tmp:
      yield tmp
  else:
    os.makedirs(out_dir, exist_ok=True)
    yield out_dir


# Weights -----------------------------------------------------------------------------------------

def _check_params(params: dict) -> None:
  """Refuses trees that would silently export the wrong function: adapters or quantized kernels."""
  flat = traverse_util.flatten_dict(params, is_leaf=lambda _, node: not isinstance(node, dict))
  for path, value in flat.items():
    if path[-1] in ("lora_a", "lora_b"):
      raise ValueError(f"{'/'.join(path)}: params still hold LoRA factors; export lora.merge_lazily(params, spec)")
    if isinstance(value, (Q.NF4Weight, Q.Int4Weight)):
      raise ValueError(f"{'/'.join(path)}: params hold a quantized kernel; export lora.merge_lazily(params, spec)")


def plan_shards(config: ModelConfig, dtype: str, max_shard_bytes: int) -> dict[str, list[str]]:
  """File name -> the HF tensor names it holds, split as transformers splits (`huggingface_hub`'s splitter).

  A shard closes when the next tensor would overflow `max_shard_bytes`; a tensor larger than the
  limit sits alone in its own shard. One shard is `model.safetensors`, n of them are
  `model-0000k-of-0000n.safetensors`.
  """
  itemsize = EXPORT_DTYPES[dtype].itemsize
  split = huggingface_hub.split_state_dict_into_shards_factory(
      hf_shapes(config), get_storage_size=lambda shape: math.prod(shape) * itemsize,
      filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_bytes)
  return split.filename_to_tensors


def _write_weights(directory: str, config: ModelConfig, params: dict, dtype: str, scan_layers: bool,
                   max_shard_bytes: int) -> None:
  """Streams the tensors in HF order into their shards; a shard is saved as soon as it is complete.

  The splitter puts a tensor above the limit into a shard of its own ahead of the shard still
  filling, so at most that one shard (under the limit) and one tensor are held at a time.
  """
  from safetensors.numpy import save_file
  np_dtype = EXPORT_DTYPES[dtype]
  expected = hf_shapes(config)
  plan = plan_shards(config, dtype, max_shard_bytes)
  file_of = {name: file for file, names in plan.items() for name in names}
  missing = {file: len(names) for file, names in plan.items()}
  filling: dict[str, dict[str, np.ndarray]] = {}
  tensors = to_hf_tensors(config, params, scan_layers=scan_layers)
  total = 0
  for want in expected:
    try:
      name, array = next(tensors)
    except KeyError as e:
      raise ValueError(f"params: no entry {e} for HF tensor '{want}'") from None
    if tuple(array.shape) != expected[name]:
      raise ValueError(f"params: HF tensor '{name}' would have shape {tuple(array.shape)}, "
                       f"expected {expected[name]}")
    file = file_of[name]
    shard = filling.setdefault(file, {})
    shard[name] = np.ascontiguousarray(array.astype(np_dtype, copy=False))
    total += shard[name].nbytes
    missing[file] -= 1
    if not missing[file]:
      shard = filling.pop(file)  # safetensors writes through a 0600 temporary file: atomic_write sets the mode
      files.atomic_write(os.path.join(directory, file), lambda tmp: save_file(shard, tmp, metadata={"format": "pt"}))
  if len(plan) > 1:
    index = {"metadata": {"total_size": total, "total_parameters": total // np_dtype.itemsize},
             "weight_map": {name: file_of[name] for name in expected}}
    files.write_json(os.path.join(directory, INDEX_NAME), index)


def generation_config_dict(config: ModelConfig, sampling: dict | None) -> dict[str, Any]:
  """generation_config.json: bos/eos from `config`, then the sampling defaults given.

  Validated as transformers would (unknown keys, or temperature without
  do_sample=True, raise UserError naming the field).
  """
  import transformers
  eos = list(config.eos_token_ids)
  out: dict[str, Any] = {"bos_token_id": config.bos_token_id,
                         "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}
  sampling = dict(sampling or {})
  known = transformers.GenerationConfig().to_dict()
  for key in sampling:
    if key not in known:
      raise UserError(f"generation_config: unknown field '{key}'")
  out.update(sampling)
  try:
    transformers.GenerationConfig(**out).validate(strict=True)
  except ValueError as e:
    raise UserError(f"generation_config: {' '.join(str(e).split())}") from None
  return out


def _write_tokenizer(directory: str, tokenizer) -> None:
  tokenizer.save_pretrained(directory)
  if getattr(tokenizer, "chat_template", None):
    # transformers 5 writes chat_template.jinja; 4.x puts the template into tokenizer_config.json.
    in_config = False
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        in_config = bool(json.load(f).get("chat_template"))
    if not in_config and not os.path.isfile(os.path.join(directory, "chat_template.jinja")):
      raise RuntimeError(f"{directory}: the tokenizer was saved without its chat template")


def write_hf_model(out_dir: str, config: ModelConfig, params: dict, tokenizer, *, dtype: str = "bfloat16",
                   scan_layers: bool = True, generation_config: dict | None = None, model_card: str = "",
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, atomic: bool = True) -> None:
  """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  params: a merged tree of plain arrays, kernels [in, out] (use `lora.merge_lazily` first:
    adapters or quantized kernels raise ValueError).
  tokenizer: a transformers tokenizer, saved with its chat template; None writes
    no tokenizer files.
  dtype: of the safetensors ("float32" or "bfloat16"; bf16 rounds to nearest even).
  generation_config: sampling defaults for generation_config.json, e.g.
    {"do_sample": True, "temperature": 0.6, "top_p": 0.9}.
  model_card: README.md text (none written when empty).
  max_shard_bytes: above it the weights are split into `model-0000k-of-0000n`
    files with `model.safetensors.index.json`.
  atomic: False writes straight into `out_dir`, for composing several writers
    under one `atomic_dir`.
  """
  if dtype not in EXPORT_DTYPES:
    raise UserError(f"--dtype={dtype}: expected one of {', '.join(EXPORT_DTYPES)}")
  if max_shard_bytes <= 0:
    raise UserError(f"max_shard_bytes={max_shard_bytes}: must be positive")
  _check_params(params)
  generation = generation_config_dict(config, generation_config)
  with _target_dir(out_dir, atomic) as directory:
    _write_weights(directory, config, params, dtype, scan_layers, max_shard_bytes)
    if tokenizer is not None:
      _write_tokenizer(directory, tokenizer)
    if model_card:
      text = model_card if model_card.endswith("\n") else model_card + "\n"
      files.write_text(os.path.join(directory, "README.md"), text)
    files.write_json(os.path.join(directory, "generation_config.json"), generation)
    # Last: without config.json an unfinished directory cannot pass for a model.
    files.write_json(os.path.join(directory, "config.json"),
                     {**config.to_hf(), "dtype": dtype, "torch_dtype": dtype, "use_cache": True})


def write_adapter(out_dir: str, adapters: dict, config: ModelConfig, spec: LoraSpec, base_model: str | None,
                  scan_layers: bool = True, *, atomic: bool = True) -> None:
  """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for `base_model` (named in
  adapter_config.json when it is a hub id, else null: see `peft.to_peft`).

  `adapters` holds `lora_a`/`lora_b` leaves (a full parameter tree with them will do).
  """
  with _target_dir(out_dir, atomic) as directory:
    peft.save_peft(directory, adapters, config, spec, base_model, scan_layers=scan_layers)


# Model card --------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_DATA_FILES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")


def _flat_items(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in d.items():
    if isinstance(value, dict):
      yield from _flat_items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _datasets(stage: dict) -> list[str]:
  data = stage.get("data")
  if data is None:
    return []
  return [str(d) for d in (data if isinstance(data, (list, tuple)) else [data])]


def _cell(value) -> str:
  return str(value).replace("|", "\\|").replace("\n", " ")


def model_card(base_model: str, stages: list[dict], license: str) -> str:
  """A markdown model card with HF's YAML front matter.

  base_model: the first stage's model PATH; a hub id goes into the metadata as `base_model`, a local
    file or directory is named in the text only, by its file name (see `files.hub_id`).
  stages: one dict per training stage, in order: `name`, `data` (a dataset or a
  list of them) and any hyperparameters (nested dicts are flattened as `a.b`).
  license: the base model's license identifier (e.g. "llama3").
  """
  # Only hub ids go into the metadata; local files are named in the text.
  datasets = list(dict.fromkeys(d for s in stages for d in _datasets(s)
                                if _HUB_ID.match(d) and not d.endswith(_DATA_FILES)))
  hub = files.hub_id(base_model)
  name = hub or os.path.basename(os.path.normpath(base_model)) or base_model
  metadata = huggingface_hub.ModelCardData(
      base_model=hub, library_name="transformers", license=license, language=["it", "en"],
      tags=["llama", "llama-3", "qlora", "lora", "merged"] + [str(s["name"]) for s in stages if s.get("name")],
      datasets=datasets or None)
  names = ", ".join(str(s.get("name", i + 1)) for i, s in enumerate(stages))
  summary = (f" Training stages: {names}; each trained a LoRA adapter that was then merged into the weights."
             if stages else "")
  where = "" if hub else " (local)"
  body = [f"# {name.rsplit('/', 1)[-1]}, fine-tuned", "", f"Base model: `{name}`{where}.{summary}", ""]
  for i, stage in enumerate(stages, 1):
    body += [f"## Stage {i}: {stage.get('name', '')}".rstrip(), ""]
    data = _datasets(stage)
    if data:
      body += [f"Data: {', '.join(f'`{d}`' for d in data)}", ""]
    rows = [(k, v) for k, v in _flat_items(stage) if k not in ("name", "data")]
    if rows:
      body += ["| hyperparameter | value |", "|---|---|"]
      body += [f"| {k} | {_cell(v)} |" for k, v in rows]
      body.append("")
  body += ["## License", "",
           f"The weights derive from `{name}` and are distributed under its license: `{license}`.", ""]
  # The body goes in as a value, not as template text: braces in a hyperparameter stay as they are.
  card = huggingface_hub.ModelCard.from_template(metadata, template_str="---\n{{ card_data }}\n---\n\n{{ body }}",
                                                 body="\n".join(body))
  return str(card)
