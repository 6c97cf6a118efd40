"""The fused LM head: each token's log-probability from the hidden states, without the [B, T, V] logits.

`head_token_stats` computes what `losses.token_stats` computes from the logits `hidden @ head`, a few
positions at a time: each chunk's [B, chunk, V] logits give their log-softmax and, when differentiated,
d log p / d hidden = (onehot - softmax) @ head^T, a [B, chunk, D] value saved for the backward pass instead
of the logits; the cotangent of each token's log-prob then only scales it. Gradients reach `hidden` only:
the head must be frozen (its cotangent is zero). Logits are computed in hidden's dtype and reduced in fp32.

Vocab-parallel under a mesh: the head is split by vocabulary over the fsdp and tensor axes (an all-to-all
of each device's shard, never the whole [D, V] matrix on one device: 1 GB in bf16 for Llama-3's 128,256
tokens), each chunk's hidden states are gathered over fsdp (the rows its devices hold), every device
computes its vocabulary slice of the logits of those rows, and the softmax's max, sum, target logit and
logit sum are combined over the split axes (Megatron's vocab-parallel cross-entropy). d log p / d hidden
is summed over the slices in fp32 and scattered back to the rows' devices. Shape legend as in `llama`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from anita_jax.model.losses import to_target
from anita_jax.model.sharding import BATCH_AXES
from anita_jax.model.splash import mesh_axes

Array = jax.Array
VOCAB_AXES = ("fsdp", "tensor")  # the mesh axes the head's vocabulary is split over


def head_token_stats(hidden_btd: Array, head: Array, input_ids_bt: Array, *, vocab_major: bool,
                     chunk: int = 16) -> tuple[Array, Array]:
  """`losses.token_stats` of the logits `hidden @ head`, computed `chunk` positions (per row) at a time.

  head: [V, D] (tied embeddings, vocab_major=True) or [D, V] (an lm_head kernel).
  """
  next_ids_bt = jnp.pad(input_ids_bt[:, 1:], ((0, 0), (0, 1)))
  logp_bt, logit_sum_bt = _head_logprobs(hidden_btd, head, next_ids_bt, vocab_major, chunk)
  vocab = head.shape[0 if vocab_major else 1]
  return to_target(logp_bt), to_target(jax.lax.stop_gradient(logit_sum_bt) / vocab)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_logprobs(x_btd, head, ids_bt, vocab_major, chunk):
  return _head(x_btd, head, ids_bt, vocab_major, chunk, with_grad=False)


def _head_logprobs_fwd(x_btd, head, ids_bt, vocab_major, chunk):
  logp, logit_sum, dlogp_dx = _head(x_btd, head, ids_bt, vocab_major, chunk, with_grad=True)
  return (logp, logit_sum), dlogp_dx


def _head_logprobs_bwd(vocab_major, chunk, dlogp_dx, cotangents):
  dlogp, _ = cotangents  # the logit sums are metrics: no gradient
  return (dlogp[..., None] * dlogp_dx).astype(dlogp_dx.dtype), None, None


_head_logprobs.defvjp(_head_logprobs_fwd, _head_logprobs_bwd)


def _head(x_btd, head, ids_bt, vocab_major: bool, chunk: int, with_grad: bool):
  """Per position: log p(ids) and the logit sum [B, T] fp32, and with_grad d log p / d x [B, T, D]; under a
  mesh whose fsdp x tensor axes split the vocabulary, vocab-parallel (module docstring)."""
  vocab = head.shape[0 if vocab_major else 1]
  ids_bt = jnp.clip(ids_bt, 0, vocab - 1)  # padding may hold ids outside the vocabulary; masks drop those entries
  mesh = jax.sharding.get_abstract_mesh()
  split = None if mesh.empty else mesh_axes(mesh, VOCAB_AXES, vocab)
  if split is None:
    return _chunks(x_btd, head, ids_bt, vocab_major, chunk, with_grad, None, None)
  split = (split,) if isinstance(split, str) else split
  rows = mesh_axes(mesh, BATCH_AXES, x_btd.shape[0])
  rows_axes = () if rows is None else (rows,) if isinstance(rows, str) else rows
  gather = tuple(a for a in split if a in rows_axes)  # the split axes whose devices hold different rows
  x_spec = P(rows, None, None)
  local = functools.partial(_chunks, vocab_major=vocab_major, chunk=chunk, with_grad=with_grad, split=split,
                            gather=gather)
  outs = (P(rows, None), P(rows, None)) + ((x_spec,) if with_grad else ())
  head_spec = P(split, None) if vocab_major else P(None, split)
  return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, head_spec, P(rows, None)), out_specs=outs,
                       check_vma=False)(x_btd, head, ids_bt)


def _chunks(x_btd, head, ids_bt, vocab_major: bool, chunk: int, with_grad: bool, split, gather):
  """`_head` of one device: the whole vocabulary (split None), or the slice of it this device holds along
  the mesh axes `split`, for the rows gathered over the axes `gather`."""
  b, t, d = x_btd.shape
  chunk = min(chunk, t)
  n = -(-t // chunk)
  pad = n * chunk - t
  xs = jnp.pad(x_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  ids = jnp.pad(ids_bt, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
  w = head.astype(x_btd.dtype)
  local_vocab = w.shape[0 if vocab_major else 1]
  offset = 0 if split is None else jax.lax.axis_index(split) * local_vocab
  total = (lambda y: y) if split is None else functools.partial(jax.lax.psum, axis_name=split)
  own_rows = (lambda y: y) if not gather else lambda y: jax.lax.dynamic_slice_in_dim(
      y, jax.lax.axis_index(gather) * b, b, axis=0)

  def one(carry, inputs):
    x_bcd, ids_bc = inputs
    if gather:
      x_bcd = jax.lax.all_gather(x_bcd, gather, axis=0, tiled=True)
      ids_bc = jax.lax.all_gather(ids_bc, gather, axis=0, tiled=True)
    logits = jnp.einsum("bcd,vd->bcv" if vocab_major else "bcd,dv->bcv", x_bcd, w).astype(jnp.float32)
    max_bc = jnp.max(logits, axis=-1, keepdims=True)
    if split is not None:
      max_bc = jax.lax.pmax(max_bc, split)
    exp = jnp.exp(logits - max_bc)
    sum_exp = total(jnp.sum(exp, axis=-1, keepdims=True))
    local_ids = ids_bc - offset
    mine = (local_ids >= 0) & (local_ids < local_vocab)
    target = jnp.take_along_axis(logits, jnp.clip(local_ids, 0, local_vocab - 1)[..., None], axis=-1)[..., 0]
    target = total(jnp.where(mine, target, 0.0))
    logp = target - (max_bc + jnp.log(sum_exp))[..., 0]
    out = (own_rows(logp), own_rows(total(jnp.sum(logits, axis=-1))))
    if with_grad:
      onehot = jax.nn.one_hot(jnp.where(mine, local_ids, -1), local_vocab, dtype=jnp.float32)
      dlogits = (onehot - exp / sum_exp).astype(x_btd.dtype)
      dx = jnp.einsum("bcv,vd->bcd" if vocab_major else "bcv,dv->bcd", dlogits, w,
                      preferred_element_type=jnp.float32)
      if split is not None:  # the slices' partial products: summed in fp32, each row back to its devices
        rest = tuple(a for a in split if a not in gather)
        dx = jax.lax.psum(dx, rest) if rest else dx
        dx = jax.lax.psum_scatter(dx, gather, scatter_dimension=0, tiled=True) if gather else dx
      out += (dx.astype(x_btd.dtype),)
    return carry, out

  _, outs = jax.lax.scan(one, None, (xs, ids))
  unchunk = lambda y: y.swapaxes(0, 1).reshape(b, n * chunk, *y.shape[3:])[:, :t]  # noqa: E731
  return tuple(unchunk(y) for y in outs)
