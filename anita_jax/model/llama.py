"""LLaMA-3 in Flax, numerically matched to transformers' LlamaForCausalLM.

Shape legend: B batch, T query length, S key length (cache or sequence),
D model width, N query heads, K kv heads, G = N / K, H head dim, F mlp width,
V vocab, L layers, R LoRA rank.

Parameters are a plain tree with HF-like names, linear kernels stored [in, out]:

  embed_tokens/embedding                  [V, D]
  layers/input_layernorm/scale            [L, D]   (scan_layers; else layers_{i}/...)
  layers/self_attn/{q,k,v,o}_proj/kernel  [L, D, N*H] ...
  layers/mlp/{gate,up,down}_proj/kernel   [L, D, F] ...
  norm/scale                              [D]
  lm_head/kernel                          [D, V]   (absent when embeddings are tied)

A projection's kernel may be a quantized node (`quant.NF4Weight`, `quant.Int4Weight`),
dequantized right before its matmul, inside the layer scan: at most one layer's
weights exist dequantized at a time. A projection may carry LoRA factors
`lora_a` [in, R] and `lora_b` [R, out] beside its kernel (see `LoraSpec`).
`adapters_enabled=False` runs the same parameters without them: the DPO
reference costs no second copy.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anita_jax.errors import UserError
from anita_jax.model import attention as AT
from anita_jax.model import flash as FL
from anita_jax.model import flash_tiles as FT
from anita_jax.model import quant as Q
from anita_jax.model import splash as SP
from anita_jax.model.config import ATTENTION_KINDS, LoraSpec, ModelConfig

Array = jax.Array


def _remat_policy(name: str):
  return {
      "full": None,  # save nothing: recompute the whole layer
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies [H/2], fp32, as transformers computes them."""
  dim = config.head_dim
  inv = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv = inv.astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = (2 * math.pi / inv).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv).astype(np.float32)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
  smoothed = ((1 - smooth) * scaled / s.factor + smooth * scaled).astype(np.float32)
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_btnh: Array, positions_bt: Array, inv_freq: np.ndarray) -> Array:
  """rotate_half RoPE (HF checkpoints are permuted for it); angles in fp32."""
  angles = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  cos, sin = jnp.cos(angles).astype(x_btnh.dtype), jnp.sin(angles).astype(x_btnh.dtype)
  half = x_btnh.shape[-1] // 2
  rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
  return x_btnh * cos + rotated * sin


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # As transformers: normalise in fp32, cast back, then scale.
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class _Projections(nn.Module):
  """What a projection and every module holding projections share: the compute and parameter dtypes, the
  LoRA adapter and whether it runs, dropout, the frozen 4-bit format."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora: LoraSpec | None = None
  adapters_enabled: bool = True
  deterministic: bool = True
  quant: Q.QuantSpec | None = None


class Linear(_Projections, kw_only=True):
  """y = x W (+ scale * B(A(dropout(x))) when a LoRA adapter is attached)."""

  features: int
  axes: tuple[str, str]

  @nn.compact
  def __call__(self, x):
    d_in = x.shape[-1]
    kernel = self.param("kernel", Q.init_fn(self.quant or Q.QuantSpec(), self.axes),
                        (d_in, self.features), self.param_dtype)
    if isinstance(kernel, (Q.NF4Weight, Q.Int4Weight)):
      y = Q.matmul(x, kernel, self.dtype)  # its backward rebuilds W from the codes: no dense W saved
    else:
      y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.lora is None:
      return y
    if self.lora.frozen_rank:  # earlier stages' adapters, frozen, scales folded into frozen_b
      # Kept in the compute dtype: the product is what casting float32 factors at use would give, bit for
      # bit, at half the memory in bfloat16.
      fa = self.param("frozen_a", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[0], "lora_rank")),
                      (d_in, self.lora.frozen_rank), self.dtype)
      fb = self.param("frozen_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
                      (self.lora.frozen_rank, self.features), self.dtype)
      # Plain dots: only the input's gradient flows through them (no weight gradients to compute).
      y = y + jnp.dot(jnp.dot(x.astype(self.dtype), fa), fb).astype(y.dtype)
    # PEFT's init: A Kaiming-uniform (a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    a = self.param("lora_a", nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0, out_axis=1),
        (self.axes[0], "lora_rank")), (d_in, self.lora.rank), jnp.float32)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
                   (self.lora.rank, self.features), jnp.float32)
    if not self.adapters_enabled:
      return y
    x_in = nn.Dropout(self.lora.dropout)(x, deterministic=self.deterministic or self.lora.dropout == 0)
    delta = lora_delta(x_in.astype(self.dtype), a.astype(self.dtype), b.astype(self.dtype), self.lora.scale)
    return y + delta.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x, a, b, scale: float):
  """scale * (x A) B over x [..., in], A [in, R], B [R, out].

  The backward pass is written out so that each weight gradient contracts the
  tokens in canonical form, [R, tokens] @ [tokens, features], transposing only
  the thin [tokens, R] factor. Left to autodiff, XLA:CPU transposes the wide
  [tokens, features] cotangent instead: a strided copy per projection per layer
  that took a quarter of a SmolLM2 step.
  """
  return scale * jnp.dot(jnp.dot(x, a), b)


def _lora_delta_fwd(x, a, b, scale):
  xa = jnp.dot(x, a)
  return scale * jnp.dot(xa, b), (x, xa, a, b)


def _lora_delta_bwd(scale, residuals, dy):
  x, xa, a, b = residuals
  lead = x.shape[:-1]
  x2, xa2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, xa.shape[-1])
  dy2 = (scale * dy).reshape(-1, dy.shape[-1])
  dxa = jnp.dot(dy2, b.T)  # [tokens, R]
  # The barrier keeps XLA from folding the thin transposes back into the dots' dimension numbers.
  xa_t, dxa_t = jax.lax.optimization_barrier((xa2.T, dxa.T))
  db = jnp.dot(xa_t, dy2)  # [R, out]
  da = jnp.dot(dxa_t, x2).T  # [in, R]
  dx = jnp.dot(dxa, a.T).reshape(*lead, x.shape[-1])
  return dx, da, db


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


class _Block(_Projections, kw_only=True):
  """A module that holds projections (`linear`) and passes its fields on to the ones it holds."""

  config: ModelConfig
  attention: str = "dot"

  def linear(self, name: str, features: int, axes: tuple[str, str]) -> Linear:
    lora = self.lora if self.lora is not None and name in self.lora.targets else None
    return Linear(features=features, axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, lora=lora,
                  adapters_enabled=self.adapters_enabled, deterministic=self.deterministic, quant=self.quant,
                  name=name)

  def child_kwargs(self) -> dict[str, Any]:
    return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                adapters_enabled=self.adapters_enabled, deterministic=self.deterministic, quant=self.quant,
                attention=self.attention)


class Attention(_Block):

  @nn.compact
  def __call__(self, x_btd, positions_bt, q_segment_bt, kv_segment_bs, branch_bt, flash_mask, cache, cache_offset):
    c = self.config
    n, k, h = c.num_heads, c.num_kv_heads, c.head_dim
    b, t, _ = x_btd.shape
    q = self.linear("q_proj", n * h, ("embed", "q_heads"))(x_btd).reshape(b, t, n, h)
    key = self.linear("k_proj", k * h, ("embed", "kv_heads"))(x_btd).reshape(b, t, k, h)
    value = self.linear("v_proj", k * h, ("embed", "kv_heads"))(x_btd).reshape(b, t, k, h)
    inv_freq = rope_inv_freq(c)
    q = apply_rope(q, positions_bt, inv_freq)
    key = apply_rope(key, positions_bt, inv_freq)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
    new_cache, offset = None, 0
    if cache is not None:
      # Write this step's keys and values at cache_offset, then attend over the whole cache.
      ck = jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), (0, cache_offset, 0, 0))
      cv = jax.lax.dynamic_update_slice(cache["v"], value.astype(cache["v"].dtype), (0, cache_offset, 0, 0))
      new_cache = {"k": ck, "v": cv}
      key, value, offset = ck.astype(self.dtype), cv.astype(self.dtype), cache_offset
    if cache is None and self.attention == "splash" and SP.usable("splash"):  # a whole sequence: q_offset 0
      o = SP.splash_attention(q, key, value, q_segment_bt)
    elif flash_mask is not None:
      o = FL.flash_attention(q, key, value, q_segment_bt, branch_bt, mask=flash_mask)
    else:
      o = AT.attention(q, key, value, q_segment_bt, kv_segment_bs, offset, branch_bt, branch_bt)
    o = o.reshape(b, t, n * h)
    return self.linear("o_proj", c.hidden_size, ("q_heads", "embed"))(o), new_cache


class Mlp(_Block):

  @nn.compact
  def __call__(self, x_btd):
    f = self.config.intermediate_size
    gate = self.linear("gate_proj", f, ("embed", "mlp"))(x_btd)
    up = self.linear("up_proj", f, ("embed", "mlp"))(x_btd)
    hidden = nn.with_logical_constraint(
        nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return self.linear("down_proj", self.config.hidden_size, ("mlp", "embed"))(hidden)


class DecoderLayer(_Block):

  @nn.compact
  def __call__(self, x_btd, positions_bt, q_segment_bt, kv_segment_bs, branch_bt, flash_mask, cache, cache_offset):
    c = self.config
    act = ("activation_batch", "activation_length", "activation_embed")
    x_btd = nn.with_logical_constraint(x_btd, act)
    y = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="input_layernorm")(x_btd)
    y, new_cache = Attention(**self.child_kwargs(), name="self_attn")(
        y, positions_bt, q_segment_bt, kv_segment_bs, branch_bt, flash_mask, cache, cache_offset)
    x_btd = x_btd + y
    y = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(x_btd)
    x_btd = x_btd + Mlp(**self.child_kwargs(), name="mlp")(y)
    return nn.with_logical_constraint(x_btd, act), new_cache


class Llama(nn.Module):
  """LlamaForCausalLM. How it runs (dtype, scan, remat, adapters) is set here, not in `config`."""

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  lora: LoraSpec | None = None
  adapters_enabled: bool = True
  deterministic: bool = True
  quant: Q.QuantSpec | None = None  # of the seven projections; embeddings, lm_head, norms stay dense
  # "splash" / "flash": a Pallas blockwise kernel (`splash.py`: causal + packed segments, masks fixed per
  # compile; `flash.py`: every mask here, packed DPO pairs included, from the ids at run time) for
  # whole-sequence forwards (training, eval); decoding with a KV cache always uses `attention.attention`.
  attention: str = "dot"

  @nn.compact
  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, *, cache=None,
               cache_offset=None, kv_segment_ids_bs=None, branch_ids_bt=None, logits: bool = True):
    """Returns (logits [B, T, V], cache).

    tokens_bt: int [B, T]. positions_bt: rotary positions (default 0..T-1).
    segment_ids_bt: packing ids, 0 = padding (default all 1).
    branch_ids_bt: int [B, T], packed DPO pairs only (`attention.attention`): 0 prompt, 1 chosen,
      2 rejected; a completion never attends to the other one. Needs model.attention dot or flash
      and no cache.
    cache: {"k", "v"} [L, B, S, K, H] from `init_cache`, updated at `cache_offset`
      (a scalar); `kv_segment_ids_bs` [B, S] are then the segment ids of the cache slots.
    logits: False returns the final normed hidden states [B, T, D] instead of the
      logits, for a loss that applies the head itself (`head.head_token_stats`).
    """
    c = self.config
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"Llama.attention={self.attention!r}: expected one of {', '.join(ATTENTION_KINDS)}")
    b, t = tokens_bt.shape
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones((b, t), jnp.int32)
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
      kv_segment_ids_bs, cache_offset = segment_ids_bt, None
    elif kv_segment_ids_bs is None:
      raise ValueError("kv_segment_ids_bs is required with a cache")
    if branch_ids_bt is not None and cache is not None:
      raise ValueError("branch_ids_bt (packed preference pairs) cannot be used with a KV cache")
    if branch_ids_bt is not None and self.attention == "splash":
      raise UserError("model.attention=splash cannot mask packed DPO pairs (chosen and rejected sharing a "
                      "prompt): set model.attention=flash or dot, or data.packing=false")

    embedding = Embed(c.vocab_size, c.hidden_size, self.param_dtype, name="embed_tokens")()
    x_btd = jnp.take(embedding, tokens_bt, axis=0).astype(self.dtype)

    kwargs = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                  adapters_enabled=self.adapters_enabled, deterministic=self.deterministic, quant=self.quant,
                  attention=self.attention)
    layer_cls = DecoderLayer
    if self.remat_policy != "none":
      layer_cls = nn.remat(DecoderLayer, policy=_remat_policy(self.remat_policy),
                           prevent_cse=not self.scan_layers)
    # The flash kernel's ids and live-tile tables depend on the batch alone: computed once, read by every layer.
    flash_mask = None
    if cache is None and self.attention == "flash" and SP.usable("flash"):
      flash_mask = FT.tables(segment_ids_bt, branch_ids_bt)
    args = (positions_bt, segment_ids_bt, kv_segment_ids_bs, branch_ids_bt, flash_mask)
    if self.scan_layers:
      layers = nn.scan(
          layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast,) * 5 + (0, nn.broadcast),
          length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(**kwargs, name="layers")
      x_btd, new_cache = layers(x_btd, *args, cache, cache_offset)
    else:
      per_layer = []
      for i in range(c.num_layers):
        layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
        x_btd, layer_cache = layer_cls(**kwargs, name=f"layers_{i}")(x_btd, *args, layer_cache, cache_offset)
        per_layer.append(layer_cache)
      new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

    x_btd = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x_btd)
    if not logits:
      return x_btd, new_cache
    if c.tie_word_embeddings:
      logits = jnp.dot(x_btd, embedding.astype(self.dtype).T)
    else:
      logits = Linear(features=c.vocab_size, axes=("embed", "vocab"), dtype=self.dtype, param_dtype=self.param_dtype,
                      name="lm_head")(x_btd)
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits, new_cache


class Embed(nn.Module):
  num_embeddings: int
  features: int
  param_dtype: Any

  @nn.compact
  def __call__(self):
    return self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict[str, Array]:
  """An empty KV cache {"k", "v"}: [L, B, S, K, H]."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def unstack_layers(params: dict, num_layers: int) -> dict:
  """A scanned parameter tree (`layers/...` with a leading [L] axis) as `layers_{i}/...`."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
