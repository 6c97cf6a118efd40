"""LoRA adapters beside the frozen weights: creation, the trainable mask, merging, PEFT files.

An adapted projection holds `kernel` (frozen; an array or a quantized node) and
`lora_a` [in, R], `lora_b` [R, out] (scanned models: a leading [L] axis). The
model reads them in place (`model.Linear`); the helpers here create, select,
merge and convert them. PEFT stores `lora_A.weight` [R, in] and
`lora_B.weight` [out, R]: the transposes of ours.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from anita_jax.model import quant as Q
from anita_jax.model.config import ModelConfig
from anita_jax.errors import UserError
from anita_jax.model.config import PROJECTIONS, LoraSpec

PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LORA_LEAVES = ("lora_a", "lora_b")
# What `train.trainable` may name besides the adapters.
TRAINABLE_GROUPS = {
    "lora": lambda path: path[-1] in LORA_LEAVES,
    "embed_tokens": lambda path: path[0] == "embed_tokens",
    "lm_head": lambda path: path[0] == "lm_head",
    "norms": lambda path: path[-1] == "scale",
}


def make_spec(rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
              targets=PROJECTIONS) -> LoraSpec:
  """A validated LoraSpec; errors name the `lora.*` config field."""
  targets = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)
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


def trainable_mask(params: dict, groups=("lora",)) -> dict:
  """A bool tree over `params`: True for the leaves of the named groups (see TRAINABLE_GROUPS)."""
  unknown = [g for g in groups if g not in TRAINABLE_GROUPS]
  if unknown:
    raise UserError(f"train.trainable: unknown group '{unknown[0]}' (choose from {', '.join(TRAINABLE_GROUPS)})")
  flat = traverse_util.flatten_dict(params, is_leaf=_is_weight)
  return traverse_util.unflatten_dict(
      {p: any(TRAINABLE_GROUPS[g](p) for g in groups) for p in flat})


def _is_weight(_, node) -> bool:
  return not isinstance(node, dict)  # quantized nodes are leaves of the parameter tree here


def flatten(tree: dict) -> dict:
  """{path tuple: weight} with quantized nodes kept whole."""
  return traverse_util.flatten_dict(tree, is_leaf=_is_weight)


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat)


def partition(params: dict, mask: dict) -> tuple[dict, dict]:
  """(trainable, frozen): two disjoint trees whose union is `params`."""
  flat = traverse_util.flatten_dict(params, is_leaf=_is_weight)
  keep = traverse_util.flatten_dict(mask)
  trainable = {p: v for p, v in flat.items() if keep[p]}
  frozen = {p: v for p, v in flat.items() if not keep[p]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(*trees: dict) -> dict:
  """The union of disjoint parameter trees (the inverse of `partition`)."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree, is_leaf=_is_weight))
  return traverse_util.unflatten_dict(flat)


def strip_adapters(params: dict) -> dict:
  flat = traverse_util.flatten_dict(params, is_leaf=_is_weight)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] not in LORA_LEAVES})


def merge(params: dict, spec: LoraSpec, dtype=jnp.float32) -> dict:
  """W' = W + scale * (A @ B) for every adapted kernel, in fp32, cast to `dtype`; adapters removed.

  Quantized kernels are dequantized first (the function that was trained); the
  result holds plain arrays, ready to be re-quantized for a following stage.
  """
  flat = traverse_util.flatten_dict(params, is_leaf=_is_weight)
  out = {}
  for path, value in flat.items():
    if path[-1] in LORA_LEAVES:
      continue
    if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
      a, b = flat[path[:-1] + ("lora_a",)], flat[path[:-1] + ("lora_b",)]
      delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
      value = (Q.dequantize(value) + spec.scale * delta).astype(dtype)
    elif path[-1] == "kernel":
      value = Q.dequantize(value).astype(dtype)
    else:
      value = jnp.asarray(value).astype(dtype)
    out[path] = value
  return traverse_util.unflatten_dict(out)


# PEFT adapter files ---------------------------------------------------------------------------

_PEFT_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def to_peft(adapters: dict, config: ModelConfig, spec: LoraSpec, base_model: str,
            scan_layers: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(tensors, adapter_config) in PEFT's LoRA format for CAUSAL_LM."""
  tensors = {}
  for i in range(config.num_layers):
    for name in spec.targets:
      node = adapters[("layers" if scan_layers else f"layers_{i}")][PARENT[name]][name]
      a, b = (np.asarray(node[k], np.float32) for k in LORA_LEAVES)
      if scan_layers:
        a, b = a[i], b[i]
      prefix = f"base_model.model.model.layers.{i}.{PARENT[name]}.{name}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T)
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T)
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "target_modules": sorted(spec.targets), "use_rslora": spec.rslora, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "modules_to_save": None, "layers_to_transform": None, "use_dora": False,
  }
  return tensors, adapter_config


def save_peft(directory: str, adapters: dict, config: ModelConfig, spec: LoraSpec, base_model: str,
              scan_layers: bool = True) -> None:
  from safetensors.numpy import save_file
  tensors, adapter_config = to_peft(adapters, config, spec, base_model, scan_layers)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as f:
    json.dump(adapter_config, f, indent=2)


def is_peft_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_peft(directory: str, config: ModelConfig, scan_layers: bool = True) -> tuple[LoraSpec, dict, str | None]:
  """(spec, adapters, base model PATH or None) of a PEFT LoRA adapter directory."""
  from safetensors import safe_open
  cfg_path = os.path.join(directory, "adapter_config.json")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      ac = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{cfg_path}: not a readable adapter config ({e})") from None
  if ac.get("peft_type") != "LORA":
    raise UserError(f"{cfg_path}: field 'peft_type' is {ac.get('peft_type')!r}; only 'LORA' is supported")
  for key, ok in (("bias", "none"), ("use_dora", False), ("fan_in_fan_out", False)):
    if ac.get(key, ok) not in (ok, None):
      raise UserError(f"{cfg_path}: field '{key}'={ac[key]!r} is not supported")
  targets = ac.get("target_modules") or []
  targets = [targets] if isinstance(targets, str) else list(targets)
  spec = make_spec(int(ac.get("r", 8)), float(ac.get("lora_alpha", 8)), float(ac.get("lora_dropout", 0.0)),
                   bool(ac.get("use_rslora", False)), tuple(t for t in PROJECTIONS if t in targets))
  file = os.path.join(directory, "adapter_model.safetensors")
  if not os.path.isfile(file):
    pickles = [f for f in os.listdir(directory) if f.endswith(".bin")]
    hint = " (pickle weights are never loaded)" if pickles else ""
    raise UserError(f"{file}: missing{hint}")
  expected = adapter_shapes(config, spec, scan_layers=False)
  flat: dict = {}
  with safe_open(file, framework="numpy") as f:
    for key in f.keys():
      m = _PEFT_RE.match(key)
      if not m or m.group(3) not in spec.targets:
        raise UserError(f"{file}: unexpected tensor '{key}'")
      layer, parent, name, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
      path = (f"layers_{layer}", parent, name, "lora_a" if which == "A" else "lora_b")
      value = f.get_tensor(key).astype(np.float32).T
      if path not in expected or value.shape != expected[path]:
        raise UserError(f"{file}: tensor '{key}' has shape {value.T.shape}, expected "
                        f"{tuple(reversed(expected.get(path, ())))}")
      flat[path] = value
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise UserError(f"{file}: adapter for {'.'.join(missing[0])} is missing")
  if scan_layers:
    stacked = {}
    for path in adapter_shapes(config, spec, scan_layers=True):
      stacked[path] = np.stack([flat[(f"layers_{i}",) + path[1:]] for i in range(config.num_layers)])
    flat = stacked
  return spec, traverse_util.unflatten_dict(flat), ac.get("base_model_name_or_path")
