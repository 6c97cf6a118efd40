"""The Flax LLaMA against transformers' LlamaForCausalLM, and invariances of how it runs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from anita_jax.model import attention as AT
from anita_jax.model import config as cfg
from anita_jax.model import llama as M
from anita_jax.convert import hf

TINY = cfg.PRESETS["tiny"]
VARIANTS = {
    "gqa-untied-llama3rope": TINY,
    "gqa-tied-plainrope": dataclasses.replace(TINY, tie_word_embeddings=True, rope_scaling=None),
    "mha-untied-plainrope": dataclasses.replace(TINY, num_kv_heads=4, rope_scaling=None),
    "mha-tied-llama3rope": dataclasses.replace(TINY, num_kv_heads=4, tie_word_embeddings=True),
    "headdim-not-hidden-over-heads": dataclasses.replace(TINY, head_dim=32),
}


def reference_model(config, seed=0):
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.15)
  return model


def our_params(reference, config, scan_layers=True):
  tensors = ((k, v.detach().numpy()) for k, v in reference.state_dict().items())
  return hf.build_params(config, tensors, source="reference", scan_layers=scan_layers)


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,attention", [(name, "dot") for name in sorted(VARIANTS)]
                         + [("gqa-untied-llama3rope", "flash"), ("mha-tied-llama3rope", "flash")])
def test_logits_match_transformers(name, attention):
  config = VARIANTS[name]
  ref = reference_model(config)
  # 150 tokens: three query blocks of `attention`, the last one partial (flash: one 256 tile, 106 padding).
  tokens = np.random.RandomState(1).randint(0, config.vocab_size, (3, 2 * AT.QUERY_BLOCK + 22))
  with torch.no_grad():
    expected = ref(torch.tensor(tokens)).logits.numpy()
  model = M.Llama(config, attention=attention)
  logits, _ = jax.jit(model.apply)({"params": our_params(ref, config)}, jnp.asarray(tokens))
  abs_err = np.abs(np.asarray(logits) - expected).max()
  assert abs_err <= 1e-4, f"max abs {abs_err:.2e}, relative {rel_err(logits, expected):.2e}"


def test_rope_frequencies_match_transformers_llama3_scaling():
  config = cfg.PRESETS["llama3.1-8b"]
  rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
      transformers.LlamaConfig(**config.to_hf()))
  np.testing.assert_allclose(M.rope_inv_freq(config), rope.inv_freq.numpy(), rtol=1e-6, atol=0)


def test_padded_rows_match_transformers_attention_mask():
  ref = reference_model(TINY)
  tokens = np.random.RandomState(2).randint(3, TINY.vocab_size, (2, AT.QUERY_BLOCK + 24))
  mask = np.ones_like(tokens)
  mask[1, 15:] = 0  # right padding, over a whole query block
  with torch.no_grad():
    expected = ref(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  logits, _ = M.Llama(TINY).apply({"params": our_params(ref, TINY)}, jnp.asarray(tokens),
                                  segment_ids_bt=jnp.asarray(mask))
  valid = mask.astype(bool)
  assert np.abs(np.asarray(logits)[valid] - expected[valid]).max() <= 1e-4


@pytest.mark.parametrize("scan, remat", [(False, "none"), (True, "full"), (False, "dots"),
                                         (True, "dots_no_batch")])
def test_scan_and_remat_do_not_change_logits(scan, remat):
  ref = reference_model(TINY, seed=3)
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, TINY.vocab_size, (2, 33)))
  base, _ = M.Llama(TINY, scan_layers=True).apply({"params": our_params(ref, TINY, True)}, tokens)
  model = M.Llama(TINY, scan_layers=scan, remat_policy=remat)
  params = our_params(ref, TINY, scan)
  other, _ = jax.jit(model.apply)({"params": params}, tokens)
  np.testing.assert_array_equal(np.asarray(other), np.asarray(base))
  # Remat must not change gradients either.
  grad = lambda m, p: jax.grad(lambda p: m.apply({"params": p}, tokens)[0].sum())(p)
  g0 = grad(M.Llama(TINY, scan_layers=scan), params)
  g1 = grad(model, params)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_packed_segments_equal_separate_sequences():
  ref = reference_model(TINY, seed=4)
  params = our_params(ref, TINY)
  model = M.Llama(TINY)
  rs = np.random.RandomState(4)
  n = AT.QUERY_BLOCK + 3  # the second sequence spans two query blocks
  a, b = rs.randint(0, TINY.vocab_size, 11), rs.randint(0, TINY.vocab_size, n)
  packed = np.concatenate([a, b, np.zeros(4, int)])[None]
  segments = np.concatenate([np.full(11, 1), np.full(n, 2), np.zeros(4, int)])[None]
  positions = np.concatenate([np.arange(11), np.arange(n), np.zeros(4, int)])[None]
  out, _ = model.apply({"params": params}, jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
  alone_a, _ = model.apply({"params": params}, jnp.asarray(a[None]))
  alone_b, _ = model.apply({"params": params}, jnp.asarray(b[None]))
  np.testing.assert_allclose(np.asarray(out[0, :11]), np.asarray(alone_a[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[0, 11:11 + n]), np.asarray(alone_b[0]), atol=1e-5)


def test_query_blocks_equal_one_piece_attention_and_gradients():
  """`attention` over a whole sequence goes in query blocks against the keys up to each block's end; the
  result and its gradients equal the one-piece [T, S] computation (`_attend`) with packed pairs' masks."""
  t = 2 * AT.QUERY_BLOCK + 37
  rs = np.random.RandomState(6)
  q, k, v = (jnp.asarray(rs.randn(2, t, heads, 16), jnp.float32) for heads in (6, 2, 2))
  # Row 0: three segments and padding; row 1: a packed pair [prompt][chosen][rejected] crossing blocks.
  segments = np.zeros((2, t), np.int32)
  segments[0, :40], segments[0, 40:150], segments[0, 150:t - 5] = 1, 2, 3
  segments[1, :] = 1
  branches = np.zeros((2, t), np.int32)
  branches[1, 50:120], branches[1, 120:] = 1, 2
  segments, branches = jnp.asarray(segments), jnp.asarray(branches)

  def out(fn, q, k, v):
    return fn(q, k, v, segments, segments, 0, branches, branches)

  blocked, whole = out(AT.attention, q, k, v), out(AT._attend, q, k, v)
  real = np.asarray(segments != 0)
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(whole)[real], rtol=1e-6, atol=1e-6)
  cotangent = jnp.asarray(rs.randn(*q.shape), jnp.float32) * jnp.asarray(real)[:, :, None, None]
  grads = [jax.grad(lambda *x, fn=fn: jnp.sum(out(fn, *x) * cotangent), argnums=(0, 1, 2))(q, k, v)
           for fn in (AT.attention, AT._attend)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def textbook_attention(q, k, v, segments, branches):
  """softmax(q k^T / sqrt(H) + mask) v over [B, T, N, H], every kv head repeated for its query heads."""
  n, h = q.shape[2], q.shape[3]
  k, v = (jnp.repeat(x, n // x.shape[2], axis=2) for x in (k, v))
  t = q.shape[1]
  allowed = (jnp.tril(jnp.ones((t, t), bool))[None] & (segments[:, :, None] == segments[:, None, :])
             & (segments[:, None, :] != 0)
             & ((branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None])))
  scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  probs = jax.nn.softmax(jnp.where(allowed[:, None], scores, -1e30), axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


def test_attention_gradients_equal_autodiff_of_the_textbook_formula():
  """The attention's backward pass is written by hand (`_softmax_attention`): its gradients, in query blocks
  over packed segments and pairs, equal jax.grad of the plain formula with the full [T, T] mask (fp32, 1e-5)."""
  t = 2 * AT.QUERY_BLOCK + 21
  rs = np.random.RandomState(8)
  q, k, v = (jnp.asarray(rs.randn(2, t, heads, 16), jnp.float32) for heads in (6, 2, 2))
  segments = np.zeros((2, t), np.int32)
  segments[0, :70], segments[0, 70:t - 9] = 1, 2
  segments[1, :100], segments[1, 100:] = 1, 2
  branches = np.zeros((2, t), np.int32)
  branches[1, 20:60], branches[1, 60:100], branches[1, 130:140], branches[1, 140:] = 1, 2, 1, 2
  segments, branches = jnp.asarray(segments), jnp.asarray(branches)
  real = jnp.asarray(segments != 0)[:, :, None, None]
  cotangent = jnp.asarray(rs.randn(*q.shape), jnp.float32) * real
  ours = lambda *x: jnp.sum(AT.attention(*x, segments, segments, 0, branches, branches) * cotangent)  # noqa: E731
  plain = lambda *x: jnp.sum(textbook_attention(*x, segments, branches) * cotangent)  # noqa: E731
  np.testing.assert_allclose(ours(q, k, v), plain(q, k, v), rtol=1e-5)
  for a, b in zip(jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.grad(plain, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_equals_full_forward(scan):
  ref = reference_model(TINY, seed=5)
  params = our_params(ref, TINY, scan)
  model = M.Llama(TINY, scan_layers=scan)
  tokens = jnp.asarray(np.random.RandomState(5).randint(0, TINY.vocab_size, (2, 20)))
  full, _ = model.apply({"params": params}, tokens)
  cache = M.init_cache(TINY, 2, 24)
  kv_seg = jnp.ones((2, 24), jnp.int32)
  logits, cache = model.apply({"params": params}, tokens[:, :12], cache=cache, cache_offset=0,
                              kv_segment_ids_bs=kv_seg)
  steps = [logits]
  for i in range(12, 20):
    logits, cache = model.apply({"params": params}, tokens[:, i:i + 1], jnp.full((2, 1), i),
                                cache=cache, cache_offset=i, kv_segment_ids_bs=kv_seg)
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_every_weight_has_its_logical_axes(scan):
  """MaxText's names: `embed` for D, `q_heads` / `kv_heads` for N*H / K*H, `mlp` for F, `vocab` for V, `norm`
  for a norm scale, `layers` for the scanned layer axis, `lora_rank` for a LoRA factor's rank axis."""
  import flax.linen as nn
  from flax import traverse_util
  model = M.Llama(TINY, scan_layers=scan, lora=M.LoraSpec(rank=4, alpha=8))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  boxed = traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed.values())
  got = {"/".join(path): x.names for path, x in boxed.items()}
  layer = {"input_layernorm/scale": ("norm",), "post_attention_layernorm/scale": ("norm",)}
  for parent, name, axes in [
      ("self_attn", "q_proj", ("embed", "q_heads")), ("self_attn", "k_proj", ("embed", "kv_heads")),
      ("self_attn", "v_proj", ("embed", "kv_heads")), ("self_attn", "o_proj", ("q_heads", "embed")),
      ("mlp", "gate_proj", ("embed", "mlp")), ("mlp", "up_proj", ("embed", "mlp")),
      ("mlp", "down_proj", ("mlp", "embed"))]:
    layer[f"{parent}/{name}/kernel"] = axes
    layer[f"{parent}/{name}/lora_a"] = (axes[0], "lora_rank")
    layer[f"{parent}/{name}/lora_b"] = ("lora_rank", axes[1])
  expected = {"embed_tokens/embedding": ("vocab", "embed"), "norm/scale": ("norm",),
              "lm_head/kernel": ("embed", "vocab")}
  for path, names in layer.items():
    if scan:
      expected[f"layers/{path}"] = ("layers",) + names
    else:
      expected.update({f"layers_{i}/{path}": names for i in range(TINY.num_layers)})
  assert got == expected
  assert all(len(x.names) == x.value.ndim for x in boxed.values())
