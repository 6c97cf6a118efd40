"""Which tiles the flash kernels (`flash.py`) compute, decided in JAX from the batch's ids, and what they cost.

The ids: one int32 per position, segment * 4 + branch (segments within +-2^29, branches 0..3; packed DPO
`[prompt][chosen][rejected]`: 0, 1, 2), padded to a multiple of the blocks with 0 (padding).

Live tiles (`live_tiles`). A tile is live when one of its real queries t
could see its kv block: the block's real keys reach into [lo, t] (first key <= t, last key >= lo, lo the
first position of t's segment id in the row) and it holds a real key on branch 0 or on t's branch. Every
visible (query, key) lies in a live tile; a live tile may still hide everything (the keys are summarised
per block), and then its mask does. Causal rows compute the tiles on and below the diagonal; packing
skips queries against earlier sequences; packed DPO skips rejected completions against their chosen.
The ids' tile layouts and the tables (`tables`) depend on the batch alone: the model computes them once per
forward, before its layers. Scalar prefetch gives the kernels, per (row, query block), its live kv blocks in
order, then the last one repeated, and their count (per kv block its live query blocks, for dk and dv): a grid
step past the count computes nothing, and its index map names the block already resident, so nothing is
fetched for it.

Block rule (`block_sizes`): 512 when T >= 512, else T rounded up to a multiple of 128 (the lane width);
T is padded to a multiple of the block with segment-0 positions, dropped on return. Padding queries see
nothing and get zeros (`attention` averages all keys there); no loss reads them and no real query sees a
padding key, so every gradient a loss reads agrees.

Each kernel call's FLOPs and HBM bytes over given live tiles (`cost`) are what XLA's cost analysis, which
cannot see inside a Pallas call, is told.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LANES = 128  # a tile's key (lane) width and the query block are multiples of this
SUBLANES = 8
MAX_BLOCK = 512  # as splash: [512, 512] fp32 scores are 1 MiB of VMEM


def block_sizes(t: int) -> tuple[int, int]:
  """(block_q, block_k) of a sequence of `t` positions (see the module docstring)."""
  block = MAX_BLOCK if t >= MAX_BLOCK else -(-t // LANES) * LANES
  return block, block


class Tables(NamedTuple):
  """A batch's ids and live-tile tables as the kernels read them (`tables`): they depend on the ids alone, so
  a model computes them once per forward and every layer's call reads them. Rows lead every field."""
  cols: jax.Array  # int32 [B, T', 128]: the ids (segment * 4 + branch, T' padded to the blocks) as tile columns
  rows: jax.Array  # int32 [B, 8, T']: the ids as tile rows (one per lane)
  kv_index: jax.Array  # int32 [B, nq * nk]: per query block its live kv blocks, then the last repeated
  kv_count: jax.Array  # int32 [B, nq]
  q_index: jax.Array  # int32 [B, nk * nq]: per kv block its live query blocks (dk, dv)
  q_count: jax.Array  # int32 [B, nk]


def tables(segment_bt, branch_bt=None, *, blocks=None) -> Tables:
  """The `Tables` of ids segment_bt [B, T] (0 = padding) and branch_bt [B, T] or None, for blocks (block_q,
  block_k), default `block_sizes(T)`."""
  block_q, block_k = blocks or block_sizes(segment_bt.shape[1])
  code = _padded_codes(segment_bt, branch_bt, block_q, block_k)
  b, t = code.shape
  live = _live(code, block_q, block_k)
  kv_index, kv_count = _compact(live)
  q_index, q_count = _compact(jnp.swapaxes(live, 1, 2))
  return Tables(jax.lax.broadcast_in_dim(code, (b, t, LANES), (0, 1)),
                jax.lax.broadcast_in_dim(code, (b, SUBLANES, t), (0, 2)),
                kv_index.reshape(b, -1), kv_count.reshape(b, -1), q_index.reshape(b, -1), q_count.reshape(b, -1))


def _padded_codes(segment_bt, branch_bt, block_q: int, block_k: int) -> jax.Array:
  """The kernels' id per position, int32 [B, T']: segment * 4 + branch (0 without branch ids), padded with
  0 (padding) to T', the multiple of both blocks the kernels run on."""
  code = jnp.asarray(segment_bt).astype(jnp.int32) * 4
  if branch_bt is not None:
    code = code + jnp.asarray(branch_bt).astype(jnp.int32)
  t, unit = code.shape[1], math.lcm(block_q, block_k)
  return jnp.pad(code, ((0, 0), (0, -(-t // unit) * unit - t)))


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"))
def live_tiles(segment_bt, branch_bt, block_q: int, block_k: int) -> jax.Array:
  """bool [B, T' / block_q, T' / block_k] (T' as the kernels pad T): the tiles the kernels compute."""
  return _live(_padded_codes(segment_bt, branch_bt, block_q, block_k), block_q, block_k)


def _first_positions(segment_bt) -> jax.Array:
  """int32 [B, T]: the first position in its row of each position's segment id (a stable sort groups the
  ids, so any id layout works, not only contiguous runs)."""
  b, t = segment_bt.shape
  order = jnp.argsort(segment_bt, axis=1, stable=True)
  ids = jnp.take_along_axis(segment_bt, order, axis=1)
  starts = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  group_start = jax.lax.cummax(jnp.where(starts, jnp.arange(t), 0), axis=1)
  first = jnp.take_along_axis(order, group_start, axis=1)  # in sorted order
  return jnp.take_along_axis(first, jnp.argsort(order, axis=1), axis=1).astype(jnp.int32)


def _live(code_bt, block_q: int, block_k: int) -> jax.Array:
  """bool [B, T / block_q, T / block_k]: the module docstring's rule, per query against per-block key
  summaries ([B, T, T / block_k] values, never [T, T])."""
  b, t = code_bt.shape
  segment, branch = code_bt >> 2, code_bt & 3
  real = segment != 0
  position = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  per_kv_block = lambda x, reduce: reduce(x.reshape(b, t // block_k, block_k), axis=-1)[:, None, :]  # noqa: E731
  k_first = per_kv_block(jnp.where(real, position, t), jnp.min)
  k_last = per_kv_block(jnp.where(real, position, -1), jnp.max)
  # bit r set when the kv block holds a real key of branch r
  k_bits = sum(per_kv_block(real & (branch == r), jnp.any).astype(jnp.int32) << r for r in range(4))
  lo, q_bits = _first_positions(segment)[:, :, None], (1 | (1 << branch))[:, :, None]
  hit = (real[:, :, None] & (k_first <= position[:, :, None]) & (k_last >= lo)
         & ((k_bits & q_bits) != 0))  # [B, T, T / block_k]
  return jnp.any(hit.reshape(b, t // block_q, block_q, t // block_k), axis=2)


def _compact(live_brc) -> tuple[jax.Array, jax.Array]:
  """(index int32 [B * R * C], count int32 [B * R]) of bool [B, R, C]: per (b, r) the live c in order, then
  the last live one repeated (0 when none), flat for SMEM."""
  count = jnp.sum(live_brc, axis=-1)
  order = jnp.argsort(~live_brc, axis=-1, stable=True)  # live columns first, ascending
  slot = jnp.minimum(jnp.arange(live_brc.shape[-1]), jnp.maximum(count - 1, 0)[..., None])
  index = jnp.take_along_axis(order, slot, axis=-1)
  return index.reshape(-1).astype(jnp.int32), count.reshape(-1).astype(jnp.int32)


def cost(live_bqk, block_q: int, block_k: int, num_heads: int, num_kv_heads: int, head_dim: int,
         itemsize: int) -> dict[str, dict[str, int]]:
  """{"forward", "dq", "dkv"}: each kernel's flops, transcendentals and HBM bytes_accessed over the live
  tiles `live_bqk` (bool [B, T/block_q, T/block_k]), inputs of `itemsize` bytes.

  Per live tile and query head: 2 block_q block_k H FLOPs per product, forward 2 (Q K^T, P V), dq 3 (Q K^T,
  dO V^T, dS K), dk/dv 4 (Q K^T, dO V^T, P^T dO, dS^T Q); block_q block_k exponentials per kernel; the
  tiles fetched (forward, dq: K and V; dk/dv: q, dO and two fp32 rows), an upper bound as a tile resident
  from the previous step is not fetched again. Once per query block and head: forward q, out, logsumexp;
  dq q, dO, dq and two rows. Once per kv block and kv head: dk/dv K, V, dK, dV. Ids and tables not counted.
  """
  live = np.asarray(live_bqk)
  b, nq, nk = live.shape
  tiles = int(live.sum()) * num_heads
  product = 2 * block_q * block_k * head_dim
  q_tile, kv_tile, row = block_q * head_dim * itemsize, block_k * head_dim * itemsize, block_q * 4
  query_blocks, kv_blocks = b * nq * num_heads, b * nk * num_kv_heads
  exps = block_q * block_k * tiles
  return {
      "forward": {"flops": 2 * product * tiles, "transcendentals": exps,
                  "bytes_accessed": 2 * kv_tile * tiles + query_blocks * (2 * q_tile + row)},
      "dq": {"flops": 3 * product * tiles, "transcendentals": exps,
             "bytes_accessed": 2 * kv_tile * tiles + query_blocks * (3 * q_tile + 2 * row)},
      "dkv": {"flops": 4 * product * tiles, "transcendentals": exps,
              "bytes_accessed": (2 * q_tile + 2 * row) * tiles + kv_blocks * 4 * kv_tile},
  }
