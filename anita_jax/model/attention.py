"""Dot-product attention for `anita_jax.model.llama`: causal, grouped-query, masked by packing ids.

Shape legend as in `llama`: B batch, T query length, S key length, N query heads,
K kv heads, G = N / K, H head dim.

Over a whole sequence the queries go in blocks, each against the keys up to its
own end (`query_block`); a KV cache's queries attend in one piece. The backward
pass is written out (`_softmax_attention`). The TPU kernel is `splash`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

QUERY_BLOCK = 64  # the smallest query block of `attention` over a whole sequence (CPU: 64 beat 32, 128, 256)
MAX_QUERY_BLOCKS = 8  # longer sequences take longer blocks: fewer key re-reads and gradient sums


def query_block(t: int) -> int:
  """The query block of `attention` over a whole sequence of `t` positions."""
  return max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS))


def score_entries(t: int) -> int:
  """The (query, key) scores `attention` computes over a whole sequence of `t` positions, of t * t."""
  block = query_block(t)
  return sum((min(start + block, t) - start) * min(start + block, t) for start in range(0, t, block))


def attention(q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, q_offset, q_branch_bt=None,
              kv_branch_bs=None) -> Array:
  """Causal, segment-aware grouped-query attention.

  Query t sits at index `q_offset + t` of the key sequence. A query attends to
  key s when s <= its index and both carry the same non-zero segment id, so
  packed sequences never see each other and padding (segment 0) is ignored.
  With branch ids (packed DPO pairs `[prompt][chosen][rejected]`: 0 prompt, 1
  chosen, 2 rejected) a query also needs the key on branch 0 or on its own
  branch: both completions see the prompt, never each other.

  Over a whole sequence (q_offset 0, T == S) the queries go in blocks
  (`query_block`), each against the keys up to its end only: of the causal
  mask's upper triangle only the blocks on the diagonal are computed. The masked
  scores it skips have a softmax weight of exactly 0, so the result is the
  one-piece computation's up to summation order.
  """
  t, s = q_btnh.shape[1], k_bskh.shape[1]
  block = query_block(t)
  if not (isinstance(q_offset, int) and q_offset == 0 and t == s and t > block):
    return _attend(q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, q_offset, q_branch_bt, kv_branch_bs)
  cut = lambda x, start, end: None if x is None else x[:, start:end]  # noqa: E731
  blocks = []
  for start in range(0, t, block):
    end = min(start + block, t)
    blocks.append(_attend(cut(q_btnh, start, end), cut(k_bskh, 0, end), cut(v_bskh, 0, end),
                          cut(q_segment_bt, start, end), cut(kv_segment_bs, 0, end), start,
                          cut(q_branch_bt, start, end), cut(kv_branch_bs, 0, end)))
  return jnp.concatenate(blocks, axis=1)


def _attend(q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, q_offset, q_branch_bt, kv_branch_bs) -> Array:
  """`attention` in one piece: the [T, S] scores of every query against every key."""
  b, t, n, h = q_btnh.shape
  k = k_bskh.shape[2]
  q_index = q_offset + jnp.arange(t)
  causal = jnp.arange(k_bskh.shape[1])[None, :] <= q_index[:, None]  # [T, S]
  same = (q_segment_bt[:, :, None] == kv_segment_bs[:, None, :]) & (kv_segment_bs[:, None, :] != 0)
  if q_branch_bt is not None:
    kv_branch = kv_branch_bs[:, None, :]
    same = same & ((kv_branch == 0) | (kv_branch == q_branch_bt[:, :, None]))
  mask = (causal[None] & same)[:, None, None]  # [B, 1, 1, T, S]
  # Query heads grouped by their kv head, [B, K, G, T, H]: the scores come out [B, K, G, T, S].
  q = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
  out = _softmax_attention(q, k_bskh, v_bskh, mask)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


@jax.custom_vjp
def _softmax_attention(q_bkgth, k_bskh, v_bskh, mask):
  """softmax(q k^T / sqrt(H), masked) v, [B, K, G, T, H]; scores and probabilities [B, K, G, T, S] in fp32,
  scaled after the product as transformers does."""
  return _softmax_attention_fwd(q_bkgth, k_bskh, v_bskh, mask)[0]


def _probabilities(q_bkgth, k_bskh, mask, row_max=None, row_sum=None):
  """(softmax probabilities [B, K, G, T, S] fp32, row max, row sum [B, K, G, T, 1]); given the forward
  pass's row max and sum, the backward pass recomputes the probabilities with them."""
  scores = jnp.einsum("bkgth,bskh->bkgts", q_bkgth, k_bskh, preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores * (q_bkgth.shape[-1] ** -0.5), jnp.finfo(jnp.float32).min)
  if row_max is None:
    row_max = jnp.max(scores, axis=-1, keepdims=True)
  exp = jnp.exp(scores - row_max)
  if row_sum is None:
    row_sum = jnp.sum(exp, axis=-1, keepdims=True)
  return exp / row_sum, row_max, row_sum


def _softmax_attention_fwd(q_bkgth, k_bskh, v_bskh, mask):
  probs, row_max, row_sum = _probabilities(q_bkgth, k_bskh, mask)
  out = jnp.einsum("bkgts,bskh->bkgth", probs.astype(v_bskh.dtype), v_bskh)
  return out, (q_bkgth, k_bskh, v_bskh, mask, row_max, row_sum, out)


def _softmax_attention_bwd(residuals, dout):
  """The gradients written out, as flash attention's backward: no [T, S] value per head is kept from the
  forward pass (the probabilities are recomputed from the softmax's row max and sum), the softmax's row sums
  come from the [T, H] output, and each key-side gradient contracts the queries of the [T, S] values in place,
  [H, T] @ [T, S]. Left to autodiff, XLA:CPU transposes the [T, S] gradient of the scores instead: a copy that
  took 6% of a packed DPO step's busy time. The score gradients enter the products in the inputs' dtype, as
  flash attention's."""
  q, k_bskh, v_bskh, mask, row_max, row_sum, out = residuals
  b, k, g, t, h = q.shape
  probs = _probabilities(q, k_bskh, mask, row_max, row_sum)[0]
  dprobs = jnp.einsum("bkgth,bskh->bkgts", dout, v_bskh, preferred_element_type=jnp.float32)
  row = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dscores = (probs * (dprobs - row) * h ** -0.5).astype(q.dtype)
  dq = jnp.einsum("bkgts,bskh->bkgth", dscores, k_bskh)
  flat = lambda x: x.reshape(b, k, g * t, x.shape[-1])  # noqa: E731
  dk = jnp.einsum("bkxh,bkxs->bkhs", flat(q), flat(dscores)).transpose(0, 3, 1, 2)
  dv = jnp.einsum("bkxh,bkxs->bkhs", flat(dout), flat(probs.astype(dout.dtype))).transpose(0, 3, 1, 2)
  return dq, dk.astype(k_bskh.dtype), dv.astype(v_bskh.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
