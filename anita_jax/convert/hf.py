"""Hugging Face LLaMA checkpoints <-> our parameter tree.

One table maps every HF tensor name to our path; HF linear weights are
[out, in] and ours [in, out]. Import is streamed: tensors are read one at a
time from safetensors, converted to their final form one layer at a time (a
`LeafTransform`: quantized, or cast), and written into preallocated stacked
leaves of that form, so host memory stays near one copy of the final parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from anita_jax.model.config import ModelConfig, from_hf
from anita_jax.errors import UserError

# HF name (layer part as {i}) -> (our path below a layer or the root, transpose).
_LAYER_TABLE = {
    "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), True),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm.weight": (("input_layernorm", "scale"), False),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), False),
}
_ROOT_TABLE = {
    "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
    "model.norm.weight": (("norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some older checkpoints carry; they are recomputed, never read.
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor an HF checkpoint of this architecture holds, with its [out, in] shape."""
  c = config
  d, f = c.hidden_size, c.intermediate_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layer = {
      "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
      "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
      "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
      "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
  }
  shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
  if not c.tie_word_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, d)
  for i in range(c.num_layers):
    shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
  return shapes


def _target(name: str) -> tuple[tuple[str, ...], int | None, bool]:
  """(our path, layer index or None, transpose) of an HF tensor name."""
  m = _LAYER_RE.match(name)
  if m:
    path, transpose = _LAYER_TABLE[m.group(2)]
    return path, int(m.group(1)), transpose
  path, transpose = _ROOT_TABLE[name]
  return path, None, transpose


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class LeafTransform:
  """How `build_params` turns checkpoint tensors into final leaves, one layer's tensor at a time.

  convert(path, array) -> node: one tensor of one layer (or a root tensor) as an [in, out]
    array (possibly a transposed view), in its stored dtype or the build dtype (see
    `build_params`) -> its final host form: an array, or a quantized node (model/quant.py)
    of that one matrix. The builder writes each layer's node at index i of a preallocated
    stacked node of the same form (a leading L axis on every array field), so nothing
    wider than one layer's tensor is ever materialised. `path` is the finished leaf's
    path (("layers", ..., "kernel") for scanned layers).
  place(path, leaf) -> leaf: each finished leaf (the whole stack for scanned layers), for
    example onto devices.
  """

  convert: Callable[[tuple[str, ...], np.ndarray], Any]
  place: Callable[[tuple[str, ...], Any], Any] = lambda path, leaf: leaf


# Source dtypes whose every value is exactly a value of the build dtype: casting them
# through it first changes nothing, so they reach `convert` as stored (no widened copy).
_EXACT_IN = {
    np.dtype(np.float32): {np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)},
    np.dtype(np.float64): {np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)},
}


def _as_read(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """`array` as if first cast to the build `dtype`: unchanged where that cast is exact."""
  if array.dtype == dtype or array.dtype in _EXACT_IN.get(dtype, ()):
    return array
  return array.astype(dtype)


def _stacked(node, layers: int):
  """An uninitialised node like `node` with a leading [L] axis on every array field."""
  return jax.tree.map(lambda x: np.empty((layers,) + np.shape(x), np.asarray(x).dtype), node)


def _write(stack, index: int, node) -> None:
  jax.tree.map(lambda dst, x: dst.__setitem__(index, x), stack, node)


def build_params(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, source: str,
                 scan_layers: bool = True, dtype=np.float32, transform: LeafTransform | None = None) -> dict:
  """Assembles our parameter tree from (HF name, array) pairs, refusing any mismatch.

  With `scan_layers` the per-layer tensors are stacked on a leading layer axis.
  Each tensor is read as `dtype` (the values it would have after that cast), then
  `transform.convert` gives its final form (default: a `dtype` array), which is written
  straight into its preallocated stacked leaf; `transform.place` sees each finished leaf.
  Host memory stays near one copy of the final leaves plus one tensor in flight.
  """
  expected = hf_shapes(config)
  dtype = np.dtype(dtype)
  transform = transform or LeafTransform(lambda path, a: np.ascontiguousarray(a, dtype))
  seen: set[str] = set()
  params: dict = {}
  stacks: dict[tuple[str, ...], Any] = {}
  filled: dict[tuple[str, ...], int] = {}
  for name, array in tensors:
    if _IGNORED.search(name):
      continue
    if name == "lm_head.weight" and config.tie_word_embeddings:
      continue  # a tied checkpoint may still store the shared matrix twice
    _check_tensor(name, array.shape, expected, source)
    seen.add(name)
    path, layer, transpose = _target(name)
    array = _as_read(np.asarray(array), dtype)
    stacked = layer is not None and scan_layers
    if layer is None:
      full = path
    else:
      full = (("layers",) if stacked else (f"layers_{layer}",)) + path
    node = transform.convert(full, array.T if transpose else array)  # given [in, out], a view
    del array  # the source goes before the node is placed
    if not stacked:
      _set(params, full, transform.place(full, node))
    else:
      if full not in stacks:
        stacks[full], filled[full] = _stacked(node, config.num_layers), 0
      _write(stacks[full], layer, node)
      filled[full] += 1
      if filled[full] == config.num_layers:
        _set(params, full, transform.place(full, stacks.pop(full)))
    del node  # and the host node before the next tensor is read
  _check_complete(expected, seen, source)
  return params


def _check_tensor(name: str, shape, expected: dict, source: str) -> None:
  if name not in expected:
    raise UserError(f"{source}: unexpected tensor '{name}' for this architecture")
  if tuple(shape) != expected[name]:
    raise UserError(f"{source}: tensor '{name}' has shape {tuple(shape)}, expected {expected[name]}")


def _check_complete(expected: dict, seen: set, source: str) -> None:
  missing = sorted(set(expected) - seen, key=_natural)
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise UserError(f"{source}: tensor '{missing[0]}' is missing{more}")


def _natural(name: str):
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def safetensors_files(directory: str) -> list[str]:
  """The safetensors files of an HF model directory (single, or sharded with an index)."""
  if not os.path.isdir(directory):
    raise UserError(f"{directory}: no such model directory")
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
      raise UserError(f"{index}: not a valid safetensors index ({e})") from None
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")
                   and not f.startswith("adapter_model"))
  if not files:
    pickles = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f" (found {pickles[0]}: pickle weights are never loaded; convert them to safetensors)"
            if pickles else "")
    raise UserError(f"{directory}: no .safetensors weights{hint}")
  paths = [os.path.join(directory, f) for f in files]
  for p in paths:
    if not os.path.isfile(p):
      raise UserError(f"{p}: listed in the index but missing")
  return paths


@contextlib.contextmanager
def _open(path: str):
  """safe_open(path) for numpy; a file it cannot read is one UserError naming it."""
  try:
    with safe_open(path, framework="numpy") as f:
      yield f
  except (OSError, ValueError, RuntimeError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"{path}: cannot read safetensors ({e})") from None


def read_safetensors(paths: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) one tensor at a time; bf16 arrives as ml_dtypes.bfloat16."""
  for path in paths:
    with _open(path) as f:
      for name in f.keys():
        yield name, f.get_tensor(name)


class StoredTensor:
  """A leaf of our tree ([in, out] where HF's is [out, in]) read from its safetensors file only when used:
  `np.asarray(leaf)` reads it whole, `leaf[i]` one layer of a stacked leaf. Merging (`lora.MergedKernel`) and
  the exporters read one matrix at a time, so a full-precision checkpoint streams through them."""

  def __init__(self, where: list[tuple[str, str]], shape: tuple[int, ...], transpose: bool, stacked: bool):
    self._where, self._transpose, self._stacked = where, transpose, stacked  # [(file, HF name)] per layer
    self.shape = ((len(where),) if stacked else ()) + shape

  def _read(self, i: int) -> np.ndarray:
    path, name = self._where[i]
    with _open(path) as f:
      array = f.get_tensor(name)
    return np.ascontiguousarray(array.T) if self._transpose else array

  def __getitem__(self, index: int) -> np.ndarray:
    if not self._stacked:
      raise TypeError("an unstacked stored tensor is read whole: np.asarray(leaf)")
    return self._read(index)

  def __array__(self, dtype=None, copy=None):
    out = np.stack([self._read(i) for i in range(len(self._where))]) if self._stacked else self._read(0)
    return out if dtype is None else out.astype(dtype)


def stored_params(directory: str, *, scan_layers: bool = True) -> tuple[ModelConfig, dict]:
  """(config, params) of an HF model directory with `StoredTensor` leaves in the stored dtype: shapes and
  names checked now, values read when used."""
  config = load_hf_config(directory)
  expected = hf_shapes(config)
  stored: dict[str, str] = {}  # HF name -> its file
  for path in safetensors_files(directory):
    with _open(path) as f:
      for name in f.keys():
        if _IGNORED.search(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
          continue
        _check_tensor(name, f.get_slice(name).get_shape(), expected, directory)
        stored[name] = path
  _check_complete(expected, set(stored), directory)
  params: dict = {}
  for name, shape in expected.items():
    path, layer, transpose = _target(name)
    shape = shape[::-1] if transpose else shape
    if layer is None:
      _set(params, path, StoredTensor([(stored[name], name)], shape, transpose, stacked=False))
    elif not scan_layers:
      _set(params, (f"layers_{layer}",) + path, StoredTensor([(stored[name], name)], shape, transpose, False))
    elif layer == 0:
      names = [re.sub(r"^model\.layers\.0\.", f"model.layers.{i}.", name) for i in range(config.num_layers)]
      _set(params, ("layers",) + path, StoredTensor([(stored[n], n) for n in names], shape, transpose, True))
  return config, params


def load_hf_dir(directory: str, *, scan_layers: bool = True, dtype=np.float32,
                transform=None) -> tuple[ModelConfig, dict]:
  """(config, params) from an HF model directory."""
  config = load_hf_config(directory)
  files = safetensors_files(directory)
  params = build_params(config, read_safetensors(files), source=directory, scan_layers=scan_layers,
                        dtype=dtype, transform=transform)
  return config, params


def to_hf_tensors(config: ModelConfig, params: dict, *, scan_layers: bool = True) -> Iterator[tuple[str, np.ndarray]]:
  """Our parameter tree as (HF name, [out, in] array) pairs, in HF's order."""
  for name in hf_shapes(config):
    path, layer, transpose = _target(name)
    if layer is not None:
      path = (("layers",) + path) if scan_layers else ((f"layers_{layer}",) + path)
    node = params
    for key in path:
      node = node[key]
    array = np.asarray(node[layer] if (layer is not None and scan_layers) else node)
    yield name, np.ascontiguousarray(array.T if transpose else array)


def load_hf_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{path}: no config.json in the model directory")
  try:
    with open(path, encoding="utf-8") as f:
      return from_hf(json.load(f), source=path)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
