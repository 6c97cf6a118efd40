"""Checkpoint import (GGUF and HF safetensors) against transformers' own loaders, on real weights."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from anita_jax.convert import loading
from anita_jax.convert import gguf as gguf_convert
from anita_jax.errors import UserError

PROMPTS = [
    "Qual è la capitale d'Italia?",
    "Scrivi una breve poesia sul mare di Sicilia, in rima.",
    "The quick brown fox jumps over the lazy dog.",
    "Explain photosynthesis in one sentence, please, for a ten year old child who loves plants.",
]


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
  directory, name = os.path.split(smollm2_gguf)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  return model.eval(), tokenizer


def _batch(tokenizer):
  ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
  length = max(map(len, ids))
  tokens = np.zeros((len(ids), length), np.int32)
  segments = np.zeros_like(tokens)
  for row, x in enumerate(ids):
    tokens[row, :len(x)], segments[row, :len(x)] = x, 1
  return ids, tokens, segments


def _ours(path, tokens, segments):
  net, params, _, _ = loading.load_pretrained(path)
  logits, _ = net.apply({"params": params}, jnp.asarray(tokens), segment_ids_bt=jnp.asarray(segments))
  return np.asarray(logits)


def test_gguf_import_matches_transformers_gguf_loader(smollm2_gguf, reference):
  model, tokenizer = reference
  ids, tokens, segments = _batch(tokenizer)
  ours = _ours(smollm2_gguf, tokens, segments)
  errors = []
  for row, x in enumerate(ids):  # the reference runs each prompt alone: no padding involved
    with torch.no_grad():
      expected = model(torch.tensor([x])).logits[0].numpy()
    errors.append(rel_err(ours[row, :len(x)], expected))
  # fp32 through 30 layers: 2e-6 to 4e-6 on most hosts, 3.9e-5 on one prompt on an AMD EPYC host (torch's
  # fp32 kernels differ by host); a wrong weight or layout gives 1e-2 and more.
  assert max(errors) <= 1e-4, errors


def test_hf_dir_import_equals_gguf_import(smollm2_gguf, smollm2_hf_dir, reference):
  _, tokenizer = reference
  _, tokens, segments = _batch(tokenizer)
  np.testing.assert_array_equal(_ours(smollm2_hf_dir, tokens, segments), _ours(smollm2_gguf, tokens, segments))


def test_gguf_config_and_tokenizer_come_from_the_file(smollm2_gguf):
  import gguf
  config = gguf_convert.gguf_config(gguf.GGUFReader(smollm2_gguf), smollm2_gguf)
  from anita_jax.model.config import PRESETS
  assert config == PRESETS["smollm2-135m"]
  tokenizer = loading.load_tokenizer(smollm2_gguf)
  text = tokenizer.apply_chat_template([{"role": "user", "content": "Ciao"}], tokenize=False,
                                       add_generation_prompt=True)
  assert text.endswith("<|im_start|>user\nCiao<|im_end|>\n<|im_start|>assistant\n")
  assert loading.stop_token_ids(tokenizer, config) == (0, 2)  # <|endoftext|>, <|im_end|>


def test_sharded_safetensors_with_index(smollm2_hf_dir, tmp_path):
  tensors = load_file(os.path.join(smollm2_hf_dir, "model.safetensors"))
  names = sorted(tensors)
  half = len(names) // 2
  out = tmp_path / "sharded"
  shutil.copytree(smollm2_hf_dir, out, ignore=shutil.ignore_patterns("model.safetensors"))
  files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
  for file, keys in files.items():
    save_file({k: tensors[k] for k in keys}, str(out / file))
  index = {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}
  (out / "model.safetensors.index.json").write_text(json.dumps(index))
  _, sharded = loading.load_weights(str(out))
  _, single = loading.load_weights(smollm2_hf_dir)
  jax.tree.map(np.testing.assert_array_equal, sharded, single)


def _edited_copy(src, dst, edit):
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  return str(dst)


def test_missing_tensor_is_named(smollm2_hf_dir, tmp_path):
  path = _edited_copy(smollm2_hf_dir, tmp_path / "m",
                      lambda t: t.pop("model.layers.7.mlp.up_proj.weight"))
  with pytest.raises(UserError, match=r"tensor 'model\.layers\.7\.mlp\.up_proj\.weight' is missing"):
    loading.load_weights(path)


def test_misshaped_tensor_is_named(smollm2_hf_dir, tmp_path):
  def edit(t):
    t["model.layers.3.self_attn.k_proj.weight"] = t["model.layers.3.self_attn.k_proj.weight"][:, :100].copy()
  path = _edited_copy(smollm2_hf_dir, tmp_path / "m", edit)
  with pytest.raises(UserError, match=r"'model\.layers\.3\.self_attn\.k_proj\.weight' has shape \(192, 100\)"):
    loading.load_weights(path)


def test_extra_tensor_is_named(smollm2_hf_dir, tmp_path):
  def edit(t):
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(576, np.float32)
  path = _edited_copy(smollm2_hf_dir, tmp_path / "m", edit)
  with pytest.raises(UserError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
    loading.load_weights(path)


def test_corrupt_gguf_and_bad_paths(smollm2_gguf, tmp_path):
  corrupt = tmp_path / "broken.gguf"
  with open(smollm2_gguf, "rb") as f:
    corrupt.write_bytes(f.read(4096))
  with pytest.raises(UserError, match="broken.gguf: not a readable GGUF file"):
    loading.load_weights(str(corrupt))
  with pytest.raises(UserError, match="no such file or directory"):
    loading.load_weights(str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps(transformers.LlamaConfig().to_dict()))
  (empty / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(UserError, match="no .safetensors weights .*pickle weights are never loaded"):
    loading.load_weights(str(empty))
