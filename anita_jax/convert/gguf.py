"""llama.cpp GGUF checkpoints -> our parameter tree.

Tensors are read one at a time through the `gguf` package (memory-mapped),
dequantized to fp32 with `gguf.quants.dequantize` (fp32/fp16/bf16 tensors are
taken as stored), renamed to their HF names, and handed to the same streaming
builder (and per-layer `hf.LeafTransform`) as an HF directory. llama.cpp stores
q_proj and k_proj with the rotary pairs interleaved; `_unpermute` restores HF's
rotate_half order (transformers' GGUF loader is the reference).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from anita_jax.model.config import ModelConfig
from anita_jax.convert import hf
from anita_jax.errors import UserError

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_ROOT_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def reader(path: str):
  """The file's `gguf.GGUFReader` (read-only, memory-mapped), parsed once while the file is unchanged:
  parsing a vocabulary's metadata takes seconds."""
  stat = os.stat(path)
  return _reader(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _reader(path: str, size: int, mtime_ns: int):
  del size, mtime_ns  # part of the cache key only
  import gguf
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001 - the gguf package raises bare ValueError/struct errors
    raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None


def _field(reader, key: str, path: str, default=None, required: bool = True):
  field = reader.fields.get(key)
  if field is None:
    if required and default is None:
      raise UserError(f"{path}: GGUF metadata '{key}' is missing")
    return default
  return field.contents()


def gguf_config(reader, path: str) -> ModelConfig:
  arch = _field(reader, "general.architecture", path)
  if arch != "llama":
    raise UserError(f"{path}: GGUF metadata 'general.architecture' is '{arch}', expected 'llama'")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise UserError(f"{path}: tensor 'rope_freqs.weight' (llama3 rope scaling) is not supported in GGUF "
                    "files; load the model's HF directory instead")
  heads = int(_field(reader, "llama.attention.head_count", path))
  hidden = int(_field(reader, "llama.embedding_length", path))
  embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embed is None:
    raise UserError(f"{path}: tensor 'token_embd.weight' is missing")
  vocab = int(_field(reader, "llama.vocab_size", path, default=int(embed.shape[-1]), required=False))
  eos = _field(reader, "tokenizer.ggml.eos_token_id", path, required=False)
  bos = _field(reader, "tokenizer.ggml.bos_token_id", path, required=False)
  return ModelConfig(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=int(_field(reader, "llama.feed_forward_length", path)),
      num_layers=int(_field(reader, "llama.block_count", path)),
      num_heads=heads,
      num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", path, default=heads, required=False)),
      head_dim=int(_field(reader, "llama.rope.dimension_count", path, default=hidden // heads, required=False)),
      rope_theta=float(_field(reader, "llama.rope.freq_base", path, default=10000.0, required=False)),
      # GGUF stores eps as float32; round-trip through float32 text to recover the config value.
      rms_norm_eps=float(f"{np.float32(_field(reader, 'llama.attention.layer_norm_rms_epsilon', path)):.6g}"),
      max_position_embeddings=int(_field(reader, "llama.context_length", path)),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=None if bos is None else int(bos),
      eos_token_ids=() if eos is None else (int(eos),),
  )


def _unpermute(w_oi: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: per head, rows (pairs interleaved) -> (halves)."""
  dim = w_oi.shape[0] // heads // 2
  return w_oi.reshape(heads, dim, 2, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape)


def _hf_name(name: str, path: str) -> str:
  if name in _ROOT_NAMES:
    return _ROOT_NAMES[name]
  m = _BLOCK_RE.match(name)
  if not m or m.group(2) not in _LAYER_NAMES:
    raise UserError(f"{path}: unexpected tensor '{name}' for this architecture")
  return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def _array(tensor, path: str) -> np.ndarray:
  """A tensor's values as an array the caller owns: unquantized types in their stored dtype
  (copied out of the memory map), quantized ones dequantized to fp32."""
  import gguf
  kind = gguf.GGMLQuantizationType
  if tensor.tensor_type in (kind.F32, kind.F16):
    return np.array(tensor.data)
  if tensor.tensor_type == kind.BF16:  # raw bytes [..., 2 * n]
    return np.array(tensor.data.view(ml_dtypes.bfloat16))
  try:
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
  except (NotImplementedError, ValueError) as e:
    raise UserError(f"{path}: tensor '{tensor.name}' cannot be dequantized ({e})") from None


def read_gguf_tensors(reader, config: ModelConfig, path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, [out, in] array) one tensor at a time: fp32, or fp16/bf16 as stored."""
  for tensor in reader.tensors:
    name = _hf_name(tensor.name, path)
    # The reader's array shape is numpy order (ggml lists dims innermost first).
    array = _array(tensor, path).reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if name.endswith("q_proj.weight"):
      array = _unpermute(array, config.num_heads)
    elif name.endswith("k_proj.weight"):
      array = _unpermute(array, config.num_kv_heads)
    yield name, array


def load_gguf(path: str, *, scan_layers: bool = True, dtype=np.float32,
              transform=None) -> tuple[ModelConfig, dict]:
  """(config, params) from a llama.cpp `.gguf` file."""
  gguf_file = reader(path)
  config = gguf_config(gguf_file, path)
  params = hf.build_params(config, read_gguf_tensors(gguf_file, config, path), source=path,
                           scan_layers=scan_layers, dtype=dtype, transform=transform)
  return config, params
