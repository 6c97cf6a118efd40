"""LoRA adapters beside the frozen weights: creation, the lazy merge, folding stacked adapters.

An adapted projection holds `kernel` (frozen; an array or a quantized node) and
`lora_a` [in, R], `lora_b` [R, out] (scanned models: a leading [L] axis). The
model reads them in place (`model.Linear`); the helpers here create, select,
merge and convert them. PEFT stores `lora_A.weight` [R, in] and
`lora_B.weight` [out, R]: the transposes of ours.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from anita_jax.model import quant as Q
from anita_jax.model import tree as PT
from anita_jax.model.tree import LORA_LEAVES
from anita_jax.model.config import ModelConfig
from anita_jax import files
from anita_jax.errors import UserError
from anita_jax.model.config import PROJECTIONS, LoraSpec

PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
FROZEN_LEAVES = ("frozen_a", "frozen_b")  # earlier stages' adapters in a stacked stage (see LoraSpec)
def make_spec(rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
              targets=PROJECTIONS) -> LoraSpec:
  """A validated LoraSpec; errors name the `lora.*` config field."""
  targets = tuple(files.split_list(targets))
  if rank <= 0:
    raise UserError(f"lora.rank={rank}: must be a positive integer")
  if alpha <= 0:
    raise UserError(f"lora.alpha={alpha}: must be positive")
  if not 0 <= dropout < 1:
    raise UserError(f"lora.dropout={dropout}: must be in [0, 1)")
  unknown = [t for t in targets if t not in PROJECTIONS]
  if unknown or not targets:
    raise UserError(f"lora.targets: unknown target module '{unknown[0] if unknown else ''}' "
                    f"(choose from {', '.join(PROJECTIONS)})")
  return LoraSpec(rank=int(rank), alpha=float(alpha), dropout=float(dropout), rslora=bool(rslora),
                  targets=targets)


def _layer_prefixes(config: ModelConfig, scan_layers: bool) -> list[tuple[str, ...]]:
  return [("layers",)] if scan_layers else [(f"layers_{i}",) for i in range(config.num_layers)]


def projection_dims(config: ModelConfig) -> dict[str, tuple[int, int]]:
  """(in, out) of each of the seven projections."""
  d, f = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
          "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def _dims(config: ModelConfig, name: str) -> tuple[int, int]:
  return projection_dims(config)[name]


def adapter_shapes(config: ModelConfig, spec: LoraSpec, scan_layers: bool = True) -> dict:
  """{flat path: shape} of every adapter leaf."""
  lead = (config.num_layers,) if scan_layers else ()
  shapes = {}
  for prefix in _layer_prefixes(config, scan_layers):
    for name in spec.targets:
      d_in, d_out = _dims(config, name)
      base = prefix + (PARENT[name], name)
      shapes[base + ("lora_a",)] = lead + (d_in, spec.rank)
      shapes[base + ("lora_b",)] = lead + (spec.rank, d_out)
  return shapes


def init_adapters(rng: jax.Array, config: ModelConfig, spec: LoraSpec, scan_layers: bool = True) -> dict:
  """PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform, a=sqrt(5)), B = 0. fp32."""
  flat = {}
  for i, (path, shape) in enumerate(sorted(adapter_shapes(config, spec, scan_layers).items())):
    if path[-1] == "lora_b":
      flat[path] = jnp.zeros(shape, jnp.float32)
    else:
      bound = 1.0 / math.sqrt(shape[-2])
      flat[path] = jax.random.uniform(jax.random.fold_in(rng, i), shape, jnp.float32, -bound, bound)
  return traverse_util.unflatten_dict(flat)


def _adapters_of(flat: dict, parent: tuple, spec: LoraSpec) -> tuple[tuple, tuple[float, ...]]:
  """((a, b) of the frozen then the trainable adapter of a kernel, as present), (their scales)."""
  adapters, scales = [], []
  for (a_name, b_name), scale in ((FROZEN_LEAVES, 1.0), (LORA_LEAVES, spec.scale)):
    if parent + (a_name,) in flat:
      adapters.append((flat[parent + (a_name,)], flat[parent + (b_name,)]))
      scales.append(float(scale))
  return tuple(adapters), tuple(scales)


def _add_adapters(w, adapters: tuple, scales: tuple[float, ...]):
  for (a, b), scale in zip(adapters, scales):
    w = w + scale * jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
  return w


def _map_kernels(params: dict, spec: LoraSpec, fn) -> dict:
  """params without adapters, each kernel replaced by fn(path, kernel, adapters, scales) (`_adapters_of`)."""
  flat = PT.flatten(params)
  out = {}
  for path, value in flat.items():
    if path[-1] in LORA_LEAVES + FROZEN_LEAVES:
      continue
    out[path] = fn(path, value, *_adapters_of(flat, path[:-1], spec)) if path[-1] == "kernel" else value
  return traverse_util.unflatten_dict(out)


@functools.partial(jax.jit, static_argnames=("scales", "dtype"))
def _merge_one(kernel, adapters, index, scales, dtype):
  """W' = W + frozen_a @ frozen_b + scale * (A @ B) in fp32, cast to `dtype`, for one matrix: layer `index` of
  stacked leaves (index None: the leaves as they are). A quantized W is dequantized first (the function that
  was trained)."""
  if index is not None:
    kernel, adapters = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False),
                                    (kernel, adapters))
  return _add_adapters(Q.dequantize(kernel), adapters, scales).astype(dtype)


class MergedKernel:
  """A merged kernel (`_merge_one`) computed only when read, one matrix at a time on the kernel's device.

  `merged[i]` is layer i of a stacked kernel [L, I, O]; `np.asarray(merged)` the whole kernel. The
  exporters read one layer's matrix at a time, so a merged model is never materialised: host memory
  stays at one matrix beyond the (quantized) parameters.
  """

  def __init__(self, kernel, adapters: tuple, scales: tuple[float, ...], dtype, stacked: bool):
    self.kernel, self.adapters, self.scales, self.dtype, self.stacked = kernel, adapters, scales, dtype, stacked
    if isinstance(kernel, Q.NF4Weight):
      self.shape = tuple(np.shape(kernel.codes)[:-2]) + tuple(kernel.shape)
    elif isinstance(kernel, Q.Int4Weight):
      self.shape = tuple(np.shape(kernel.values)[:-2]) + tuple(kernel.shape)
    else:
      self.shape = tuple(np.shape(kernel))

  def __getitem__(self, index: int):
    if not self.stacked:
      raise TypeError("an unstacked merged kernel is read whole: np.asarray(kernel)")
    kernel, adapters = self.kernel, self.adapters
    if _read_lazily(kernel):  # that layer alone, read now
      kernel, adapters, index = kernel[index], jax.tree.map(lambda x: x[index], adapters), None
    return np.asarray(jax.device_get(_merge_one(kernel, adapters, index, self.scales, jnp.dtype(self.dtype))))

  def __array__(self, dtype=None, copy=None):
    if self.stacked:
      out = np.stack([self[i] for i in range(self.shape[0])])
    else:
      kernel = np.asarray(self.kernel) if _read_lazily(self.kernel) else self.kernel
      out = np.asarray(jax.device_get(_merge_one(kernel, self.adapters, None, self.scales, jnp.dtype(self.dtype))))
    return out if dtype is None else out.astype(dtype)


def _read_lazily(kernel) -> bool:
  """A kernel read from its file when used (`convert.hf.StoredTensor`), not an array or a quantized node."""
  return not isinstance(kernel, (jax.Array, np.ndarray, Q.NF4Weight, Q.Int4Weight))


def merge_lazily(params: dict, spec: LoraSpec, dtype=jnp.float32) -> dict:
  """The merged model: every adapted or quantized kernel a `MergedKernel` (W plus its adapters, in `dtype`),
  computed when an exporter reads it; the other leaves as they are. Kernels under `layers` are stacked.
  Adapters leave the tree: the result is ready for export or re-quantization for a following stage."""
  def lazy(path, w, adapters, scales):
    if not adapters and not isinstance(w, (Q.NF4Weight, Q.Int4Weight)):
      return w
    return MergedKernel(w, adapters, scales, jnp.dtype(dtype), stacked=path[0] == "layers")
  return _map_kernels(params, spec, lazy)


def fold(params: dict, spec: LoraSpec) -> tuple[dict, LoraSpec]:
  """(adapters, spec) of one plain LoRA adapter of rank frozen_rank + rank equal to the frozen and the
  trainable adapters together: A = [frozen_a, lora_a] stacked along the rank, B = [frozen_b; scale * lora_b],
  scale 1 (alpha = rank, no rsLoRA). For PEFT export, and as the next stacked stage's frozen adapter."""
  flat = PT.flatten(params)
  out = {}
  for path, a in flat.items():
    if path[-1] != "lora_a":
      continue
    parent = path[:-1]
    a, b = jnp.asarray(a, jnp.float32), spec.scale * jnp.asarray(flat[parent + ("lora_b",)], jnp.float32)
    if parent + ("frozen_a",) in flat:
      a = jnp.concatenate([jnp.asarray(flat[parent + ("frozen_a",)], jnp.float32), a], axis=-1)
      b = jnp.concatenate([jnp.asarray(flat[parent + ("frozen_b",)], jnp.float32), b], axis=-2)
    out[parent + ("lora_a",)], out[parent + ("lora_b",)] = a, b
  rank = spec.frozen_rank + spec.rank
  return traverse_util.unflatten_dict(out), LoraSpec(rank=rank, alpha=float(rank), dropout=spec.dropout,
                                                     rslora=False, targets=spec.targets)


def as_frozen(adapters: dict) -> dict:
  """A folded adapter (`fold`) renamed to the frozen leaves of a stacked stage."""
  names = dict(zip(LORA_LEAVES, FROZEN_LEAVES))
  flat = traverse_util.flatten_dict(adapters, is_leaf=PT.is_leaf)
  return traverse_util.unflatten_dict({p[:-1] + (names[p[-1]],): v for p, v in flat.items()})
