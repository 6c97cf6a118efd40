"""Blockwise (flash) attention whose mask comes from ids given at run time: one Pallas kernel, forward and
backward, for causal rows, packed sequences and packed DPO pairs.

`flash_attention` computes what `model.attention.attention` computes over a whole sequence (q_offset 0,
T == S) for every query with a non-zero segment, without materialising the [T, S] scores: the kernels
walk [block_q, block_k] tiles of Q K^T with the softmax's running max and sum in fp32 (FlashAttention-2).
The forward saves the logsumexp; the backward recomputes each tile's probabilities from it, in one kernel
for dq (the kv tiles of a query block) and one for dk, dv (the query tiles of a kv block, over the G = N / K
query heads of its kv head: K and V are never repeated). Shape legend as in `llama`.

The mask, computed inside each tile: query t sees key s when s <= t, both have the same non-zero segment
id, and with branch ids (packed DPO `[prompt][chosen][rejected]`: 0, 1, 2) the key's branch is 0 or the
query's. The kernels read one int32 per position, segment * 4 + branch (segments within +-2^29, branches
0..3), laid out as splash lays out its segment ids: [T, 128] (an id per tile row), [8, T] (per column).

Live tiles (`live_tiles`), decided in JAX from the ids. A tile is live when one of its real queries t
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

Sharding as `splash`: under a mesh, `shard_map` with rows over (data, fsdp) and kv heads over tensor.
On the CPU the kernels run in Pallas interpret mode (tests); elsewhere than a TPU use the plain path.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from anita_jax.errors import UserError
from anita_jax.model.sharding import BATCH_AXES
from anita_jax.model.splash import mesh_axes, mesh_platform

LANES = 128  # a tile's key (lane) width and the query block are multiples of this
SUBLANES = 8
MAX_BLOCK = 512  # as splash: [512, 512] fp32 scores are 1 MiB of VMEM
MAX_HEAD_DIM = 256
DTYPES = ("float32", "bfloat16")
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: max() and exp() of masked rows stay NaN-free
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def block_sizes(t: int) -> tuple[int, int]:
  """(block_q, block_k) of a sequence of `t` positions (see the module docstring)."""
  block = MAX_BLOCK if t >= MAX_BLOCK else -(-t // LANES) * LANES
  return block, block


def check(head_dim: int, length: int, dtype) -> None:
  """Raises UserError (one line naming model.attention) for a shape or dtype the kernel cannot take."""
  name, problem = jnp.dtype(dtype).name, None
  if head_dim <= 0 or head_dim % SUBLANES or head_dim > MAX_HEAD_DIM or (head_dim > LANES and head_dim % LANES):
    problem = f"head_dim {head_dim} is not supported (a multiple of {SUBLANES} up to {LANES}, or {MAX_HEAD_DIM})"
  elif name not in DTYPES:
    problem = f"dtype {name} is not supported ({' or '.join(DTYPES)})"
  elif length <= 0:
    problem = f"sequence length {length} must be positive"
  if problem:
    raise UserError(f"config field 'model.attention'=flash: {problem}; use model.attention=dot")


class Tables(NamedTuple):
  """A batch's ids and live-tile tables as the kernels read them (`tables`): they depend on the ids alone, so
  a model computes them once per forward and every layer's call reads them. Rows lead every field."""
  code: jax.Array  # int32 [B, T']: segment * 4 + branch, T' padded to the blocks
  cols: jax.Array  # int32 [B, T', 128]: the ids as tile columns (one per sublane row)
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
  return Tables(code, jax.lax.broadcast_in_dim(code, (b, t, LANES), (0, 1)),
                jax.lax.broadcast_in_dim(code, (b, SUBLANES, t), (0, 2)),
                kv_index.reshape(b, -1), kv_count.reshape(b, -1), q_index.reshape(b, -1), q_count.reshape(b, -1))


def flash_attention(q_btnh, k_bskh, v_bskh, segment_bt, branch_bt=None, *, blocks=None,
                    mask: Tables | None = None) -> jax.Array:
  """`attention.attention(q, k, v, segment, segment, 0, branch, branch)` on every non-padding query.

  q_btnh [B, T, N, H]; k_bskh, v_bskh [B, T, K, H] (K divides N); segment_bt int [B, T], 0 = padding;
  branch_bt int [B, T] or None. blocks: (block_q, block_k), multiples of 128; default `block_sizes(T)`.
  mask: `tables(segment_bt, branch_bt, blocks=blocks)`, when the caller has it (computed here otherwise).
  Returns [B, T, N, H] in q's dtype (zeros on padding queries).
  """
  (b, t, n, _), k = q_btnh.shape, k_bskh.shape[2]
  if k_bskh.shape[1] != t or v_bskh.shape != k_bskh.shape or n % k:
    raise ValueError(f"flash_attention: q {q_btnh.shape}, k {k_bskh.shape} and v {v_bskh.shape} must share T "
                     "and K, and K must divide N")
  block_q, block_k = blocks or block_sizes(t)
  if block_q % LANES or block_k % LANES:
    raise ValueError(f"flash_attention: blocks {block_q, block_k} must be multiples of {LANES}")
  if mask is None:
    mask = tables(segment_bt, branch_bt, blocks=(block_q, block_k))
  pad = ((0, 0), (0, 0), (0, mask.code.shape[1] - t), (0, 0))
  q = jnp.pad(jnp.transpose(q_btnh, (0, 2, 1, 3)), pad)  # [B, N, T, H]
  key = jnp.pad(jnp.transpose(k_bskh, (0, 2, 1, 3)).astype(q.dtype), pad)  # [B, K, S, H]
  value = jnp.pad(jnp.transpose(v_bskh, (0, 2, 1, 3)).astype(q.dtype), pad)

  mesh = jax.sharding.get_abstract_mesh()
  interpret = mesh_platform(mesh) != "tpu"
  local = lambda q, k, v, mask: _flash(q, k, v, mask, block_q, block_k, interpret)  # noqa: E731
  if not mesh.empty and mesh.size > 1:
    rows, heads = mesh_axes(mesh, BATCH_AXES, b), mesh_axes(mesh, ("tensor",), k)
    qkv = P(rows, heads, None, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, Tables(*(P(rows) for _ in Tables._fields))),
                          out_specs=qkv, check_vma=False)
  out = local(q, key, value, mask)[:, :, :t]
  return jnp.transpose(out, (0, 2, 1, 3))


def _padded_codes(segment_bt, branch_bt, block_q: int, block_k: int) -> jax.Array:
  """The kernels' id per position, int32 [B, T']: segment * 4 + branch (0 without branch ids), padded with
  0 (padding) to T', the multiple of both blocks the kernels run on."""
  code = jnp.asarray(segment_bt).astype(jnp.int32) * 4
  if branch_bt is not None:
    code = code + jnp.asarray(branch_bt).astype(jnp.int32)
  t, unit = code.shape[1], math.lcm(block_q, block_k)
  return jnp.pad(code, ((0, 0), (0, -(-t // unit) * unit - t)))


# ---- live tiles ----------------------------------------------------------------------------------------------

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


# ---- kernels -------------------------------------------------------------------------------------------------

def _visible(q_code, kv_code, q_position, kv_position) -> jax.Array:
  """The mask of `attention.attention` on a tile; the arguments broadcast to its shape."""
  q_segment, kv_segment = q_code >> 2, kv_code >> 2
  kv_branch = kv_code & 3
  return ((kv_position <= q_position) & (q_segment == kv_segment) & (kv_segment != 0)
          & ((kv_branch == 0) | (kv_branch == (q_code & 3))))


def _dot(a, b, dims) -> jax.Array:
  """A product accumulated in fp32. bf16 operands at the MXU's native precision (exact products; Mosaic
  takes no other for them); fp32 ones at the configured precision, as the plain path's."""
  precision = None if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _lanes(x_rl, width: int) -> jax.Array:
  """A lane-replicated [rows, 128] value as [rows, width] (width <= 128, or a multiple of 128)."""
  return x_rl[:, :width] if width <= LANES else jnp.tile(x_rl, (1, width // LANES))


def _query_tile(q_ref, k_ref, q_code_ref, kv_code_ref, q_start, kv_start):
  """(fp32 scores [block_q, block_k], scaled after the product as the plain path; mask) of the forward and
  dq kernels' tile whose first query and key are at `q_start`, `kv_start`."""
  scores = _dot(q_ref[...], k_ref[...], NT) * (q_ref.shape[-1] ** -0.5)
  iota = lambda axis: jax.lax.broadcasted_iota(jnp.int32, scores.shape, axis)  # noqa: E731
  mask = _visible(jnp.tile(q_code_ref[...], (1, scores.shape[1] // LANES)), kv_code_ref[:1, :],
                  q_start + iota(0), kv_start + iota(1))
  return scores, mask


def _forward_kernel(kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, q_code_ref, kv_code_ref,
                    o_ref, lse_ref, m_ref, l_ref, acc_ref, *, block_q, block_k, num_k):
  """One (row, query block, head, kv step): online softmax over the live kv tiles of the query block."""
  b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(3)
  row = b * pl.num_programs(1) + i
  head_dim = q_ref.shape[-1]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(j < kv_count_ref[row])
  def _tile():
    scores, mask = _query_tile(q_ref, k_ref, q_code_ref, kv_code_ref, i * block_q,
                               kv_index_ref[row * num_k + j] * block_k)
    scores = jnp.where(mask, scores, MASK_VALUE)
    m_prev = m_ref[...]  # [block_q, 128], lane-replicated
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(scores - _lanes(m_next, block_k)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    acc_ref[...] = _lanes(alpha, head_dim) * acc_ref[...] + _dot(p.astype(v_ref.dtype), v_ref[...], NN)

  @pl.when(j == num_k - 1)
  def _store():
    l = l_ref[...]
    l = jnp.where(l == 0, 1.0, l)  # a query that sees nothing (padding): output 0
    o_ref[...] = (acc_ref[...] / _lanes(l, head_dim)).astype(o_ref.dtype)
    lse_ref[...] = (m_ref[...] + jnp.log(l)).T[:1, :]  # the column as a [1, block_q] row


def _dq_kernel(kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, q_code_ref, kv_code_ref, lse_ref, di_ref,
               do_ref, dq_ref, dq_acc_ref, *, block_q, block_k, num_k):
  """One (row, query block, head, kv step) of dq = sum over live kv tiles of dS K."""
  b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(3)
  row = b * pl.num_programs(1) + i
  head_dim = q_ref.shape[-1]

  @pl.when(j == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  @pl.when(j < kv_count_ref[row])
  def _tile():
    scores, mask = _query_tile(q_ref, k_ref, q_code_ref, kv_code_ref, i * block_q,
                               kv_index_ref[row * num_k + j] * block_k)
    k = k_ref[...]
    lse = jnp.expand_dims(lse_ref[0], -1)  # [block_q, 1]
    di = jnp.expand_dims(di_ref[0], -1)
    p = jnp.where(mask, jnp.exp(scores - lse), 0.0)
    dp = _dot(do_ref[...], v_ref[...], NT)
    ds = (p * (dp - di) * (head_dim ** -0.5)).astype(k.dtype)
    dq_acc_ref[...] += _dot(ds, k, NN)

  @pl.when(j == num_k - 1)
  def _store():
    dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(q_index_ref, q_count_ref, q_ref, k_ref, v_ref, q_code_ref, kv_code_ref, lse_ref, di_ref,
                do_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, block_q, block_k, num_q):
  """One (row, kv block, kv head, query head of its group, query step) of dk and dv, in the transposed
  orientation [block_k, block_q] so that the query-side values are rows and every product is plain."""
  b, j, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(3), pl.program_id(4)
  row = b * pl.num_programs(1) + j
  head_dim = q_ref.shape[-1]

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  @pl.when(i < q_count_ref[row])
  def _tile():
    q_block = q_index_ref[row * num_q + i]
    q, do = q_ref[...], do_ref[...]
    scores = _dot(k_ref[...], q, NT) * (head_dim ** -0.5)
    iota = lambda axis: jax.lax.broadcasted_iota(jnp.int32, scores.shape, axis)  # noqa: E731 [block_k, block_q]
    mask = _visible(q_code_ref[:1, :], jnp.tile(kv_code_ref[...], (1, block_q // LANES)),
                    q_block * block_q + iota(1), j * block_k + iota(0))
    p = jnp.where(mask, jnp.exp(scores - lse_ref[...]), 0.0)  # lse, di: [1, block_q]
    dv_acc_ref[...] += _dot(p.astype(do.dtype), do, NN)
    dp = _dot(v_ref[...], do, NT)
    ds = (p * (dp - di_ref[...]) * (head_dim ** -0.5)).astype(q.dtype)
    dk_acc_ref[...] += _dot(ds, q, NN)

  @pl.when((g == pl.num_programs(3) - 1) & (i == num_q - 1))
  def _store():
    dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


# ---- pallas calls --------------------------------------------------------------------------------------------

def _estimate(q, k, block_q, block_k, kernel: str) -> pl.CostEstimate:
  """`cost` of the causal tiles (every mask's upper bound; the ids are not known when compiling) for XLA's
  cost analysis, which cannot see inside a Pallas call."""
  b, n, t, h = q.shape
  nq, nk = t // block_q, t // block_k
  causal = np.arange(nk)[None, :] * block_k <= (np.arange(nq)[:, None] + 1) * block_q - 1
  live = np.broadcast_to(causal, (b, nq, nk))
  return pl.CostEstimate(**cost(live, block_q, block_k, n, k.shape[1], h, q.dtype.itemsize)[kernel])


def _query_major_specs(q, k, block_q, block_k):
  """Block specs (q, kv, q ids, kv ids, fp32 row) of the forward and dq kernels, whose grid is (row,
  query block, head, kv step): kv step j of query block i reads the table's j-th live kv block."""
  _, n, t, h = q.shape
  group, nq, nk = n // k.shape[1], t // block_q, t // block_k
  live = lambda b, i, j, kv_index: kv_index[(b * nq + i) * nk + j]  # noqa: E731
  return (pl.BlockSpec((None, None, block_q, h), lambda b, i, n, j, *_: (b, n, i, 0)),
          pl.BlockSpec((None, None, block_k, h), lambda b, i, n, j, kv, _: (b, n // group, live(b, i, j, kv), 0)),
          pl.BlockSpec((None, block_q, LANES), lambda b, i, n, j, *_: (b, i, 0)),
          pl.BlockSpec((None, SUBLANES, block_k), lambda b, i, n, j, kv, _: (b, 0, live(b, i, j, kv))),
          pl.BlockSpec((None, None, 1, block_q), lambda b, i, n, j, *_: (b, n, 0, i)))


def _forward(q, k, v, mask, block_q, block_k, interpret):
  """(out [B, N, T, H], logsumexp fp32 [B, N, 1, T]) of padded inputs."""
  b, n, t, h = q.shape
  nq, nk = t // block_q, t // block_k
  q_spec, kv_spec, q_code_spec, kv_code_spec, row_spec = _query_major_specs(q, k, block_q, block_k)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, nq, n, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_code_spec, kv_code_spec], out_specs=[q_spec, row_spec],
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, h), jnp.float32)])
  kernel = functools.partial(_forward_kernel, block_q=block_q, block_k=block_k, num_k=nk)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, interpret=interpret, name="flash_forward",
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, 1, t), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=_estimate(q, k, block_q, block_k, "forward"),
  )(mask.kv_index.reshape(-1), mask.kv_count.reshape(-1), q, k, v, mask.cols, mask.rows)


def _dq(q, k, v, mask, lse, di, do, block_q, block_k, interpret):
  """dq [B, N, T, H] of padded inputs."""
  b, n, t, h = q.shape
  nq, nk = t // block_q, t // block_k
  q_spec, kv_spec, q_code_spec, kv_code_spec, row_spec = _query_major_specs(q, k, block_q, block_k)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, nq, n, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_code_spec, kv_code_spec, row_spec, row_spec, q_spec],
      out_specs=q_spec, scratch_shapes=[pltpu.VMEM((block_q, h), jnp.float32)])
  kernel = functools.partial(_dq_kernel, block_q=block_q, block_k=block_k, num_k=nk)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, interpret=interpret, name="flash_dq",
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=_estimate(q, k, block_q, block_k, "dq"),
  )(mask.kv_index.reshape(-1), mask.kv_count.reshape(-1), q, k, v, mask.cols, mask.rows, lse, di, do)


def _dkv(q, k, v, mask, lse, di, do, block_q, block_k, interpret):
  """(dk, dv) [B, K, T, H] of padded inputs. Grid (row, kv block, kv head, query head of its group, query
  step): query step i of kv block j reads the table's i-th live query block."""
  (b, n, t, h), kv_heads = q.shape, k.shape[1]
  group, nq, nk = n // kv_heads, t // block_q, t // block_k
  live = lambda b, j, i, q_index: q_index[(b * nk + j) * nq + i]  # noqa: E731
  q_spec = pl.BlockSpec((None, None, block_q, h),
                        lambda b, j, kh, g, i, qi, _: (b, kh * group + g, live(b, j, i, qi), 0))
  kv_spec = pl.BlockSpec((None, None, block_k, h), lambda b, j, kh, g, i, *_: (b, kh, j, 0))
  row_spec = pl.BlockSpec((None, None, 1, block_q),
                          lambda b, j, kh, g, i, qi, _: (b, kh * group + g, 0, live(b, j, i, qi)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, nk, kv_heads, group, nq),
      in_specs=[q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, SUBLANES, block_q), lambda b, j, kh, g, i, qi, _: (b, 0, live(b, j, i, qi))),
                pl.BlockSpec((None, block_k, LANES), lambda b, j, kh, g, i, *_: (b, j, 0)), row_spec, row_spec, q_spec],
      out_specs=[kv_spec, kv_spec],
      scratch_shapes=[pltpu.VMEM((block_k, h), jnp.float32), pltpu.VMEM((block_k, h), jnp.float32)])
  kernel = functools.partial(_dkv_kernel, block_q=block_q, block_k=block_k, num_q=nq)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, interpret=interpret, name="flash_dkv",
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      cost_estimate=_estimate(q, k, block_q, block_k, "dkv"),
  )(mask.q_index.reshape(-1), mask.q_count.reshape(-1), q, k, v, mask.rows, mask.cols, lse, di, do)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q_bnth, k_bksh, v_bksh, mask, block_q, block_k, interpret):
  """The kernels on padded inputs: q [B, N, T, H], k and v [B, K, T, H], mask the batch's `Tables`."""
  return _forward(q_bnth, k_bksh, v_bksh, mask, block_q, block_k, interpret)[0]


def _flash_fwd(q, k, v, mask, block_q, block_k, interpret):
  out, lse = _forward(q, k, v, mask, block_q, block_k, interpret)
  return out, (q, k, v, mask, out, lse)


def _flash_bwd(block_q, block_k, interpret, residuals, dout):
  q, k, v, mask, out, lse = residuals
  # The softmax's row term sum_s P dP = dO . O, fp32 as the plain path's, laid out as the logsumexp.
  di = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
  dout = dout.astype(q.dtype)
  dq = _dq(q, k, v, mask, lse, di, dout, block_q, block_k, interpret)
  dk, dv = _dkv(q, k, v, mask, lse, di, dout, block_q, block_k, interpret)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
