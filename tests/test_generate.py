"""Generation against transformers' greedy decoding and logits warpers, and the generate.py script."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from anita_jax.infer import generate as G
from anita_jax.convert import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Qual è la capitale d'Italia?"


def run_script(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"), *args],
                        capture_output=True, text=True, env=env, timeout=600)


def transformers_greedy(path, prompts, max_new_tokens):
  if os.path.isfile(path):
    directory, name = os.path.split(path)
    kwargs = dict(gguf_file=name)
  else:
    directory, kwargs = path, {}
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
  texts = []
  for prompt in prompts:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
  return texts


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gguf", "hf_dir"])
def test_script_prints_transformers_greedy_continuation(which, smollm2_gguf, smollm2_hf_dir):
  path = smollm2_gguf if which == "gguf" else smollm2_hf_dir
  result = run_script(f"--model={path}", f"--prompt={PROMPT}", "--temperature=0", "--max_new_tokens=32")
  assert result.returncode == 0, result.stderr
  assert result.stdout == transformers_greedy(path, [PROMPT], 32)[0] + "\n"


def test_batched_prompts_equal_transformers_one_by_one(smollm2_gguf):
  prompts = [PROMPT, "Write a haiku about autumn leaves falling.", "Come si prepara il risotto alla milanese?"]
  net, params, tokenizer, config = loading.load_pretrained(smollm2_gguf)
  generator = G.Generator(net, params, tokenizer, loading.stop_token_ids(tokenizer, config),
                          config.max_position_embeddings, batch_size=4)
  ours = generator.generate(prompts, G.SamplingSpec(max_new_tokens=24))
  assert ours == transformers_greedy(smollm2_gguf, prompts, 24)


def test_logit_filters_match_transformers_warpers():
  rs = np.random.RandomState(0)
  logits = rs.normal(0, 3, (4, 50)).astype(np.float32)
  for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.6, 50, 0.9), (1.0, 1, 0.5)]:
    warpers = transformers.LogitsProcessorList(
        [transformers.TemperatureLogitsWarper(temperature)]
        + ([transformers.TopKLogitsWarper(top_k)] if top_k else [])
        + ([transformers.TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = warpers(None, torch.tensor(logits)).numpy()
    ours = np.asarray(G.filter_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k),
                                      jnp.float32(top_p)))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6)


def test_sampling_is_seeded_and_respects_top_k_1(smollm2_gguf):
  net, params, tokenizer, config = loading.load_pretrained(smollm2_gguf)
  generator = G.Generator(net, params, tokenizer, loading.stop_token_ids(tokenizer, config),
                          config.max_position_embeddings)
  greedy = generator.generate([PROMPT], G.SamplingSpec(max_new_tokens=12))
  top1 = generator.generate([PROMPT], G.SamplingSpec(max_new_tokens=12, temperature=0.8, top_k=1), seed=3)
  assert top1 == greedy  # top_k=1 keeps only the argmax
  spec = G.SamplingSpec(max_new_tokens=12, temperature=1.0, top_p=0.95)
  assert generator.generate([PROMPT], spec, seed=1) == generator.generate([PROMPT], spec, seed=1)


@pytest.mark.slow
def test_prompt_longer_than_context_is_one_error_line(smollm2_gguf):
  result = run_script(f"--model={smollm2_gguf}", "--prompt=" + "ciao " * 9000, "--max_new_tokens=8")
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: prompt 1:") and "8192" in lines[0], result.stderr


@pytest.mark.slow
def test_missing_model_is_one_error_line(tmp_path):
  result = run_script(f"--model={tmp_path}/absent", "--prompt=ciao")
  assert result.returncode != 0
  assert result.stderr.strip() == f"error: {tmp_path}/absent: no such file or directory"


def test_quantized_decoding_keeps_one_layer_dequantized():
  """The compiled prefill + decode loop of an NF4 SmolLM2-shaped model, 2 vs 4 layers (memory_analysis): with
  the layers `loading.decode_scan` picks for NF4 (scanned) the temporaries grow by far less than one layer of
  dequantized weights; unrolled, XLA keeps every layer dequantized at once (an 8B model: 32 GB)."""
  import dataclasses

  from flax import linen as nn

  from anita_jax.model import config as cfg
  from anita_jax.model import llama as M
  from anita_jax.model import quant as Q
  base = cfg.PRESETS["smollm2-135m"]
  d = base
  one_layer = 4 * (d.hidden_size * d.head_dim * (2 * d.num_heads + 2 * d.num_kv_heads)
                   + 3 * d.hidden_size * d.intermediate_size)
  tokens, segments = jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32)

  def temps(layers, scan):
    net = M.Llama(dataclasses.replace(base, num_layers=layers), quant=Q.QuantSpec("nf4"), scan_layers=scan)
    params = nn.meta.unbox(jax.eval_shape(net.init, jax.random.key(0), tokens)["params"])
    compiled = G._generate.lower(net, params, tokens, segments, jnp.asarray([2]), jax.random.key(0),
                                 jnp.float32(0), jnp.int32(0), jnp.float32(1), max_new_tokens=8,
                                 greedy=True).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  scan = loading.decode_scan("nf4")
  assert scan and not loading.decode_scan("none")
  growth = temps(4, scan) - temps(2, scan)
  unrolled_growth = temps(4, False) - temps(2, False)
  print(f"decode temporaries per 2 extra layers: scanned {growth}, unrolled {unrolled_growth}; one layer "
        f"dequantized {one_layer}")
  assert growth < one_layer / 10
  assert unrolled_growth >= 2 * one_layer  # why decode_scan: unrolled, every layer stays dequantized


def test_bf16_decoding_on_cpu_keeps_the_vocab_tables_in_float32_and_no_copy_of_them(tiny_hf_dir):
  """XLA:CPU converts a bf16 lm_head / embedding to a float32 copy hoisted out of the decoding loop (4.2 GB
  for Llama-3-8B); `loading.load_pretrained` keeps their bf16 values in float32 on CPU instead. The compiled
  prefill + decode loop then holds no vocab-sized temporary, and the tables hold exactly bf16 values."""
  import dataclasses

  from flax import linen as nn

  from anita_jax.model import config as cfg
  from anita_jax.model import llama as M
  from anita_jax.model import quant as Q
  assert jax.default_backend() == "cpu"
  net, params, _, _ = loading.load_pretrained(tiny_hf_dir, dtype="bfloat16", quant="nf4")
  table = np.asarray(params["embed_tokens"]["embedding"])
  assert table.dtype == np.float32
  np.testing.assert_array_equal(table, table.astype(jnp.bfloat16).astype(np.float32))

  config = dataclasses.replace(cfg.PRESETS["llama3-8b"], num_layers=1, hidden_size=256, intermediate_size=512,
                               num_heads=2, num_kv_heads=1, head_dim=128)
  net = M.Llama(config, quant=Q.QuantSpec("nf4"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  tokens, segments = jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32)
  abstract = nn.meta.unbox(jax.eval_shape(net.init, jax.random.key(0), tokens)["params"])
  table_bytes = config.vocab_size * config.hidden_size * 4

  def temps(table_dtype):
    params = {**abstract,
              "embed_tokens": {"embedding": jax.ShapeDtypeStruct((config.vocab_size, config.hidden_size), table_dtype)},
              "lm_head": {"kernel": jax.ShapeDtypeStruct((config.hidden_size, config.vocab_size), table_dtype)}}
    compiled = G._generate.lower(net, params, tokens, segments, jnp.asarray([2]), jax.random.key(0),
                                 jnp.float32(0), jnp.int32(0), jnp.float32(1), max_new_tokens=4,
                                 greedy=True).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  bf16_tables, float32_tables = temps(jnp.bfloat16), temps(jnp.float32)
  print(f"decode temporaries: bf16 tables {bf16_tables}, float32 tables {float32_tables}; one table {table_bytes}")
  assert float32_tables < table_bytes / 4 < bf16_tables
