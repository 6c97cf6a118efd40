"""PEFT LoRA adapter files <-> our adapter trees (layers stacked or unrolled)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from flax import traverse_util

from anita_jax import files
from anita_jax.errors import UserError
from anita_jax.model.config import PROJECTIONS, LoraSpec, ModelConfig
from anita_jax.model.lora import LORA_LEAVES, PARENT, adapter_shapes, make_spec


_PEFT_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def to_peft(adapters: dict, config: ModelConfig, spec: LoraSpec, base_model: str | None,
            scan_layers: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(tensors, adapter_config) in PEFT's LoRA format for CAUSAL_LM.

  base_model_name_or_path is `base_model` when it is a hub id, else null (PEFT's default): a local
  path would mean nothing on another machine; PeftModel.from_pretrained(base, dir) takes the base given.
  """
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
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": files.hub_id(base_model),
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "target_modules": sorted(spec.targets), "use_rslora": spec.rslora, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "modules_to_save": None, "layers_to_transform": None, "use_dora": False,
  }
  return tensors, adapter_config


def save_peft(directory: str, adapters: dict, config: ModelConfig, spec: LoraSpec, base_model: str | None,
              scan_layers: bool = True) -> None:
  """adapter_model.safetensors and adapter_config.json (see `to_peft`) into `directory`."""
  from safetensors.numpy import save_file
  tensors, adapter_config = to_peft(adapters, config, spec, base_model, scan_layers)
  os.makedirs(directory, exist_ok=True)
  files.atomic_write(os.path.join(directory, "adapter_model.safetensors"),  # sets the mode safetensors' 0600 file
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
  files.write_json(os.path.join(directory, "adapter_config.json"), adapter_config)


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
