"""Blockwise causal attention for training: the Pallas TPU splash kernel behind `model.attention`'s layouts.

`splash_attention` computes what `model.attention` computes for a training or
eval forward (no KV cache, q_offset 0, T == S) without materialising the
[T, S] scores: the kernel walks [block, block] tiles of Q K^T, keeps the
softmax running max and sum in fp32, and skips every tile above the causal
diagonal (about half of them at 8192 tokens). Packing follows the same rule:
a query sees key s <= t of its own non-zero segment. The kernel is the GQA
variant (`make_splash_mha` with fewer kv heads): query head n reads kv head
n // G, so K and V are never repeated to N heads.

Block rule: block = 512 when T >= 512, else T rounded up to a multiple of 128
(the lane width the kernel tiles by); T is then padded up to a multiple of the
block with segment-0 positions, which no real query can see, and the padded
rows are dropped on return. At T = 8192 nothing is padded.

Padding (segment 0): the kernel masks by segment equality, so a padding query
attends to the padding keys at or before it (at least itself): its output is
finite, and differs from `model.attention`'s (a uniform average over all
keys). No loss reads those rows, and no real query sees a padding key, so the
gradients of everything a loss reads are the same.

Sharding: under a mesh set with `jax.set_mesh` (as `train.in_mesh` does), the
kernel runs in `shard_map`, rows split over (data, fsdp) and kv heads over
tensor, as MaxText shards its splash call; a mesh axis that does not divide
its dimension is left out (sharding.py's rule). Without a mesh in context the
kernel is called as is, which is right on one device. On several TPU devices
the compiler cannot partition a Mosaic kernel by itself ("Mosaic kernels cannot
be automatically partitioned"), so there, without a mesh in context, `usable()` is
False and the model runs its plain attention instead, with a warning: trace
the step under `jax.set_mesh(mesh)` to get the kernel.

On the CPU (the tests) the kernel runs in Pallas interpret mode: the same
program, evaluated with ordinary XLA ops. Slow; use `attention="dot"` there
for anything but checking. On GPUs `usable()` is False (with a warning) and
the plain attention runs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as SK
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as SM
from jax.sharding import PartitionSpec as P

from anita_jax.model.sharding import BATCH_AXES

LANES = 128  # the kernel's kv tiles are multiples of this
MAX_BLOCK = 512  # MaxText's default splash tile; [512, 512] fp32 scores are 1 MiB of VMEM


def block_size(t: int) -> int:
  """The q and kv tile of a sequence of `t` positions (see the module docstring)."""
  return MAX_BLOCK if t >= MAX_BLOCK else -(-t // LANES) * LANES


def _kernel(length: int, num_heads: int, block: int, interpret: bool):
  """The splash kernel of a causal [length, length] mask over `num_heads` query heads.

  Built inside the trace (its mask tables become constants of the program; the
  library caches the numpy tables): cached as a kernel object, those tables
  would be arrays of the first trace, or of devices a compile-only topology cannot run.
  """
  mask = SM.MultiHeadMask([SM.CausalMask((length, length)) for _ in range(num_heads)])
  sizes = SK.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return SK.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_bnth, k_bksh, v_bksh, segment_bt, *, interpret: bool):
  """The kernel over one device's rows: q [B, N, T, H], k and v [B, K, S, H], segment ids [B, T]."""
  b, n, t, h = q_bnth.shape
  kernel = _kernel(t, n, block_size(t), interpret)

  def one_row(q, k, v, segment):
    return kernel(q, k, v, segment_ids=SK.SegmentIds(q=segment, kv=segment))

  return jax.vmap(one_row)(q_bnth, k_bksh, v_bksh, segment_bt)


def mesh_axes(mesh, axes: tuple[str, ...], dim: int):
  """The mesh axes of `axes` present in `mesh`, or None when their product does not divide `dim`."""
  axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or dim % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes if len(axes) > 1 else axes[0]


def mesh_platform(mesh) -> str:
  """The platform the program being traced runs on: the mesh's devices, else JAX's default backend."""
  return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def usable(kind: str = "splash") -> bool:
  """Whether a Pallas TPU kernel (`model.attention=kind`: splash, or flash of `flash.py`) should run in the
  program being traced; warns once when it should not.

  Not on GPUs (TPU kernels; elsewhere only Pallas' interpreter runs them,
  which is meant for checking on the CPU), and not on several TPU devices
  without a mesh in context (the compiler cannot partition a Mosaic kernel by itself).
  """
  mesh = jax.sharding.get_abstract_mesh()
  platform = mesh_platform(mesh)
  if platform in ("gpu", "cuda", "rocm"):
    _warn_gpu(kind)
    return False
  if mesh.empty and platform == "tpu" and jax.device_count() > 1:
    _warn_unsharded(kind)
    return False
  return True


def splash_attention(q_btnh, k_bskh, v_bskh, segment_bt) -> jax.Array:
  """Causal, segment-aware grouped-query attention of a whole sequence: `model.attention` with q_offset 0.

  q_btnh [B, T, N, H]; k_bskh, v_bskh [B, T, K, H] (N a multiple of K);
  segment_bt int [B, T], 0 = padding. Returns [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q_btnh.shape
  k = k_bskh.shape[2]
  if k_bskh.shape[1] != t or n % k:
    raise ValueError(f"splash_attention: q {q_btnh.shape} and k {k_bskh.shape} must share T, and K must divide N")
  mesh = jax.sharding.get_abstract_mesh()
  platform = mesh_platform(mesh)
  # The plain path scales the fp32 scores; the kernel takes q pre-scaled (rounded once to q's dtype).
  q = (q_btnh.astype(jnp.float32) * (h ** -0.5)).astype(q_btnh.dtype)
  block = block_size(t)
  padded = -(-t // block) * block
  q = jnp.transpose(q, (0, 2, 1, 3))  # [B, N, T, H]
  key = jnp.transpose(k_bskh, (0, 2, 1, 3)).astype(q.dtype)  # [B, K, S, H]
  value = jnp.transpose(v_bskh, (0, 2, 1, 3)).astype(q.dtype)
  segment = segment_bt.astype(jnp.int32)
  if padded != t:
    pad = ((0, 0), (0, 0), (0, padded - t), (0, 0))
    q, key, value = jnp.pad(q, pad), jnp.pad(key, pad), jnp.pad(value, pad)
    segment = jnp.pad(segment, ((0, 0), (0, padded - t)))

  local = functools.partial(_local, interpret=platform != "tpu")
  if not mesh.empty and mesh.size > 1:
    rows = mesh_axes(mesh, BATCH_AXES, b)
    heads = mesh_axes(mesh, ("tensor",), k)
    qkv = P(rows, heads, None, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)), out_specs=qkv,
                          check_vma=False)
  out = local(q, key, value, segment)[:, :, :t]  # [B, N, T, H]
  return jnp.transpose(out, (0, 2, 1, 3))


@functools.cache
def _warn_gpu(kind: str) -> None:
  logging.warning("model.attention=%s is a TPU kernel; on GPU the plain attention runs instead "
                  "(set model.attention=dot to silence this)", kind)


@functools.cache
def _warn_unsharded(kind: str) -> None:
  logging.warning("model.attention=%s: no mesh in context (jax.set_mesh) on %d TPU devices; the Pallas kernel "
                  "cannot be partitioned without one, so the plain attention runs instead", kind, jax.device_count())


def causal_blocks(t: int) -> tuple[int, int]:
  """(tiles the kernel computes, tiles of the full [T, T] product) of a causal sequence of `t` positions."""
  blocks = -(-t // block_size(t))
  return blocks * (blocks + 1) // 2, blocks * blocks

