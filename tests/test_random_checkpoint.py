"""scripts/random_checkpoint.py's library against transformers: a tiny Llama-3-architecture model (real Llama-3
vocabulary and tokenizer) written in several shards, loaded by transformers and by our importer."""

import json
import os
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from anita_jax.convert import loading
from anita_jax.convert import random_checkpoint as R
from anita_jax.errors import UserError
from anita_jax.model.config import PRESETS, ModelConfig

CONFIG = ModelConfig(
    vocab_size=128256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_ids=(128009,))
MAX_SHARD = 10 * 10**6  # embeddings and lm_head (16.4 MB each in bf16) get shards of their own
CHAT = [{"role": "system", "content": "Sei un assistente. "}, {"role": "user", "content": "Qual è la capitale?"},
        {"role": "assistant", "content": " Roma."}, {"role": "user", "content": "E della Francia?"}]
# Meta's Llama-3 chat format, written out: BOS once, each turn's content trimmed and closed by <|eot_id|>.
CHAT_TEXT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSei un assistente.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nQual è la capitale?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\nRoma.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nE della Francia?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama3_tokenizer):
  out = str(tmp_path_factory.mktemp("random") / "model")
  lines = []
  written = R.write_random_checkpoint(out, CONFIG, llama3_tokenizer, seed=0, max_shard_bytes=MAX_SHARD,
                                      progress=lines.append)
  return out, written, lines


def test_transformers_loads_it_in_bf16_with_no_missing_or_unexpected_keys(checkpoint):
  out, _, _ = checkpoint
  model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert isinstance(model, transformers.LlamaForCausalLM)
  state = model.state_dict()
  assert {t.dtype for t in state.values()} == {torch.bfloat16}
  for name, t in state.items():
    x = t.float()
    if name.endswith("norm.weight"):
      assert torch.all(x == 1), name
    else:  # normal, std 0.02
      assert abs(x.std().item() - 0.02) < 0.002 and abs(x.mean().item()) < 0.002, name
  assert not torch.equal(state["model.embed_tokens.weight"], state["lm_head.weight"])


def test_index_lists_every_tensor_once_in_the_shard_that_holds_it(checkpoint):
  out, written, lines = checkpoint
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  shards = sorted(f for f in written if f.endswith(".safetensors"))
  n = len(shards)
  assert n >= 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
  held = {}
  for shard in shards:
    with safe_open(os.path.join(out, shard), "np") as f:
      names = list(f.keys())
      assert f.metadata() == {"format": "pt"}
      assert sum(np.prod(f.get_slice(k).get_shape()) * 2 for k in names) <= MAX_SHARD or len(names) == 1
    for name in names:
      assert name not in held, name
      held[name] = shard
  assert held == index["weight_map"]
  model = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(out))
  assert set(held) == set(model.state_dict())
  assert index["metadata"]["total_size"] == 2 * sum(p.numel() for p in model.parameters())
  assert [line.split(":")[0] for line in lines[:n]] == shards  # each shard saved as soon as complete


def test_our_importer_gives_transformers_logits(checkpoint, llama3_tokenizer):
  out, _, _ = checkpoint
  reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = llama3_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
  with torch.no_grad():
    expected = reference(torch.tensor([ids])).logits[0].numpy()
  net, params, tokenizer, config = loading.load_pretrained(out)
  assert config == CONFIG
  logits, _ = net.apply({"params": params}, jnp.asarray([ids]), segment_ids_bt=jnp.ones((1, len(ids)), jnp.int32))
  error = np.abs(np.asarray(logits[0]) - expected).max() / np.abs(expected).max()
  assert error <= 1e-5, error


def test_tokenizer_renders_a_llama3_chat_as_meta(checkpoint):
  out, _, _ = checkpoint
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert len(tokenizer) == 128256
  assert tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == CHAT_TEXT
  ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
  assert ids == tokenizer(CHAT_TEXT, add_special_tokens=False)["input_ids"]
  assert ids.count(128000) == 1 and ids[0] == 128000 and ids.count(128009) == 4
  assert tokenizer("Hello world")["input_ids"] == [128000, 9906, 1917]  # the hub tokenizer adds BOS
  assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f) == {"bos_token_id": 128000, "eos_token_id": 128009}


def test_memory_stays_near_one_shard(tmp_path):
  """Python-side allocations (numpy's are traced) peak at about one shard and one float32 tensor."""
  config = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=4,
                       num_kv_heads=2, head_dim=64, bos_token_id=1, eos_token_ids=(2,))
  total, shard, largest_f32 = 2 * config.num_params, 2 * 10**6, 4 * 1024 * 256
  tracemalloc.start()
  try:
    written = R.write_random_checkpoint(str(tmp_path / "m"), config, None, max_shard_bytes=shard)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert sum(1 for f in written if f.endswith(".safetensors")) >= 8
  assert peak < shard + 2 * largest_f32 + 10**6 < total / 3, (peak, total)


def test_interrupted_write_leaves_nothing(tmp_path):
  out = tmp_path / "m"

  def stop(line):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    R.write_random_checkpoint(str(out), CONFIG, None, max_shard_bytes=MAX_SHARD, progress=stop)
  assert os.listdir(tmp_path) == []


def test_presets_get_a_tokenizer_of_their_vocabulary_or_one_error():
  tokenizer = R.preset_tokenizer("smollm2-135m", PRESETS["smollm2-135m"])
  assert len(tokenizer) == 49152 and "<|im_start|>" in tokenizer.chat_template
  with pytest.raises(UserError, match="--preset=tiny: no tokenizer of its vocabulary"):
    R.preset_tokenizer("tiny", PRESETS["tiny"])
  with pytest.raises(UserError, match="--preset=llama4: expected one of"):
    R.preset_config("llama4")
  assert R.parse_size("5GB") == 5 * 10**9 and R.parse_size("2GiB") == 2 * 2**30
