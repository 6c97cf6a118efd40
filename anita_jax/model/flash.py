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

Live tiles, the tables the kernels read and their cost: `flash_tiles`. The model computes the tables once
per forward, before its layers (`flash_tiles.tables`); scalar prefetch gives them to the kernels.

Sharding as `splash`: under a mesh, `shard_map` with rows over (data, fsdp) and kv heads over tensor.
On the CPU the kernels run in Pallas interpret mode (tests); elsewhere than a TPU use the plain path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from anita_jax.errors import UserError
from anita_jax.model.flash_tiles import LANES, SUBLANES, Tables, block_sizes, cost, tables
from anita_jax.model.sharding import BATCH_AXES
from anita_jax.model.splash import mesh_axes, mesh_platform

MAX_HEAD_DIM = 256
DTYPES = ("float32", "bfloat16")
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: max() and exp() of masked rows stay NaN-free
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


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
  pad = ((0, 0), (0, 0), (0, mask.cols.shape[1] - t), (0, 0))  # to the padded length T'
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
