"""Frozen-weight quantization of the seven linear projections: NF4 (QLoRA) and int4.

Shape legend: I in features, O out features, P = I / block_size NF4 blocks along I,
G double-quantization groups, g = I / group_size int4 groups. Any leading axes
(L layers of a scanned model) may come first; each [I, O] matrix is quantized alone.

Our kernels are [I, O]; HF and bitsandbytes hold the same weight as [O, I]. NF4 here
reproduces `bitsandbytes.functional.quantize_4bit(w_oi, blocksize, quant_type="nf4",
compress_statistics=...)` on the CPU bit for bit, and so does `dequantize`, jitted or not
(the one host-dependent step, torch's summation order in the offset, is under
`_torch_mean`). Every array that grows with the weight keeps the weight's [I, O]
orientation, so it can be sharded along the weight's logical axes:

  NF4Weight.codes          uint8 [..., I/2, O]  rows 2i (high nibble) and 2i+1 (low nibble)
           .absmax         fp32  [..., P, O]    without double quantization
           .absmax_q       uint8 [..., P, O]    with it: an index into DYNAMIC_CODE
           .absmax_scale   fp32  [..., G]       one per 256 blocks: tiny, replicated
           .absmax_offset  fp32  [...]          mean block absmax of the matrix
  Int4Weight.values        int4  [..., I, O]
            .scales        fp32  [..., g, O]

`quantize` runs on the host in numpy, one checkpoint tensor at a time; `dequantize`
runs in jnp right before the matmul. `matmul` is that product with a backward pass that
dequantizes again from the codes instead of keeping the dense weight: whatever remat policy
wraps a layer, only the 4-bit leaves live between the forward and the backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from anita_jax.errors import UserError

Array = jax.Array
QUANT_TYPES = ("none", "nf4", "int4")

# The 16 NF4 levels (QLoRA, Appendix E), index 0..15.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# A value's code is the number of midpoints strictly below it (bucketize, right=False),
# so a value exactly on a midpoint takes the lower level.
_NF4_MIDPOINTS = ((NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)).astype(np.float32)

# The positive half of bitsandbytes' signed 8-bit dynamic code,
# `create_dynamic_map(signed=True)`. Hard-coded because torch builds it with a
# vectorised linspace whose last bits depend on the CPU's vector width.
_DYNAMIC_POSITIVE = np.array([
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05,
    0.00015625001, 0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006,
    0.00083125, 0.0009437501, 0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497,
    0.00409375, 0.0046562497, 0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875,
    0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625, 0.01421875, 0.01703125,
    0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625, 0.036718752,
    0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375,
    0.07890625, 0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126,
    0.09859375, 0.107031256, 0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376,
    0.19140625, 0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374,
    0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375,
    0.41640624, 0.43046874, 0.44453126, 0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437,
    0.5289062, 0.54296875, 0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438,
    0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437,
    0.75390625, 0.7679688, 0.78203124, 0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374,
    0.86640626, 0.8804687, 0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375,
    0.9789063, 0.99296874], np.float32)
DYNAMIC_CODE = np.concatenate(
    [-_DYNAMIC_POSITIVE[::-1], [0.0], _DYNAMIC_POSITIVE, [1.0]]).astype(np.float32)  # [256], sorted
DQ_GROUP = 256  # blocks per double-quantization group
_LUT_SIZE = 65536


def _dynamic_lut() -> np.ndarray:
  """bitsandbytes' CPU 8-bit quantizer: the nearest code of each of 65536 grid points on [-1, 1].

  Its kernel rounds a normalised value onto this grid and looks the code up, so a value
  within half a grid step (1.5e-5) of a midpoint between codes may take the farther code.
  """
  mids = (np.float32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])).astype(np.float32)
  grid = np.float32(-1) + np.float32(2) * np.arange(_LUT_SIZE, dtype=np.float32) / np.float32(_LUT_SIZE - 1)
  return np.searchsorted(mids, grid.astype(np.float32), side="left").astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lut()

# The double-quantization offset is torch's fp32 `absmax.mean()` on the CPU: a sum in torch's
# order, then one division. A float64 sum rounded once can differ from it in the last bit, and
# that ulp moves a centred absmax lying near a bin edge of the 8-bit quantizer into the next
# code (1.3% on that block). The order below is ATen's `cascade_sum` (SumKernel.cpp) for a
# contiguous fp32 vector, with torch's 8-float vectors (AVX2, NEON, default builds) and one
# thread: above `_TORCH_GRAIN` elements a multi-threaded torch sums each thread's share first.
_TORCH_LANES = 8
_TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE


def _running_sum(acc: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """acc + rows[0] + rows[1] + ... in fp32, strictly left to right (a numpy reduction may pair)."""
  return np.cumsum(np.concatenate([acc[None], rows]), axis=0, dtype=np.float32)[-1]


def _multi_row_sum(rows: np.ndarray) -> np.ndarray:
  """ATen's multi_row_sum of rows [S, ...] -> [...]: four levels of running sums, 2^k rows each."""
  size = rows.shape[0]
  power = max(4, (1 if size <= 2 else (size - 1).bit_length()) // 4)  # CeilLog2(size) / 4
  step = 1 << power
  acc = np.zeros((4,) + rows.shape[1:], np.float32)
  i = 0
  while i + step <= size:
    acc[0] = _running_sum(acc[0], rows[i:i + step])
    i += step
    for level in range(1, 4):
      acc[level] += acc[level - 1]
      acc[level - 1] = 0
      if i & ((step - 1) << (level * power)):
        break
  acc[0] = _running_sum(acc[0], rows[i:])
  for level in range(1, 4):
    acc[0] += acc[level]
  return acc[0]


def _row_sum(x: np.ndarray) -> np.ndarray:
  """ATen's row_sum of x [S, ...] -> [...]: four interleaved cascades, then the leftover rows."""
  s = x.shape[0] // 4
  partial = _multi_row_sum(x[:4 * s].reshape((s, 4) + x.shape[1:]))  # [4, ...]
  total = _running_sum(partial[0], x[4 * s:])
  return _running_sum(total, partial[1:])


def _torch_sum_serial(x: np.ndarray, lanes: int) -> np.float32:
  n = x.shape[0]
  if n < lanes:
    return np.float32(_row_sum(x))
  v = n // lanes
  lane_sums = _row_sum(x[:v * lanes].reshape(v, lanes))  # one cascade per vector lane
  return np.float32(_running_sum(np.zeros((), np.float32), np.concatenate([x[v * lanes:], lane_sums])))


def _torch_mean(x: np.ndarray, lanes: int = _TORCH_LANES, threads: int = 1) -> np.float32:
  """torch.mean of a contiguous fp32 vector on the CPU, bit for bit, given torch's vector width
  (`lanes`: 8, or 16 on an AVX512 build) and intra-op thread count."""
  x = np.ascontiguousarray(x, np.float32).reshape(-1)
  n = x.shape[0]
  if n < _TORCH_GRAIN or threads == 1:
    total = _torch_sum_serial(x, lanes)
  else:  # at::parallel_for's split, then a sum over the per-thread buffer
    tasks = min(threads, -(-n // _TORCH_GRAIN))
    chunk = -(-n // tasks)
    partials = np.zeros(threads, np.float32)
    for t in range(tasks):
      partials[t] = _torch_sum_serial(x[t * chunk:(t + 1) * chunk], lanes)
    total = _torch_sum_serial(partials, lanes)
  return np.float32(total / np.float32(n))


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How the frozen projections are stored.

  type: "none" (dense, compute dtype), "nf4" (QLoRA's 4-bit NormalFloat) or "int4"
    (symmetric, per group).
  block_size: the NF4 block, or the int4 group, in elements along `in`.
  double_quant: NF4 only: quantize the block absmax to 8 bits as QLoRA does.
  """

  type: str = "none"
  block_size: int = 64
  double_quant: bool = True

  def __post_init__(self):
    if self.type not in QUANT_TYPES:
      raise UserError(f"quant.type: unknown quantization {self.type!r}; expected one of {', '.join(QUANT_TYPES)}")
    if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
      raise UserError(f"quant.block_size: must be a positive integer, got {self.block_size!r}")

  def validate(self, in_features: int, name: str = "weight") -> None:
    """Raises UserError unless a weight with `in_features` inputs can be stored this way."""
    if self.type == "none":
      return
    if in_features % self.block_size:
      raise UserError(f"quant.block_size: {self.block_size} does not divide the input dimension "
                      f"{in_features} of {name}")
    if self.type == "nf4" and in_features % 2:
      raise UserError(f"quant.type: nf4 packs two inputs per byte, but {name} has {in_features} inputs")


def _lookup(table: np.ndarray, index) -> Array:
  """table[index] for a small replicated table: the result takes the index's sharding.

  Under an Explicit mesh a plain gather cannot choose between the two shardings.
  """
  index = jnp.asarray(index).astype(jnp.int32)
  return jnp.asarray(table).at[index].get(mode="promise_in_bounds", out_sharding=jax.typeof(index).sharding)


@struct.dataclass
class NF4Weight:
  """An NF4 weight [..., I, O]; `shape` is the trailing (I, O) of one matrix. See the module docstring."""

  shape: tuple[int, int] = struct.field(pytree_node=False)
  block_size: int = struct.field(pytree_node=False)
  double_quant: bool = struct.field(pytree_node=False)
  codes: Any
  absmax: Any = None
  absmax_q: Any = None
  absmax_scale: Any = None
  absmax_offset: Any = None

  def block_absmax(self) -> Array:
    """The absmax of every block [..., P, O], fp32."""
    if not self.double_quant:
      return jnp.asarray(self.absmax, jnp.float32)
    i, o = self.shape
    p = i // self.block_size
    # bitsandbytes numbers blocks row-major over its [O, P] layout: block (p, o) is o * P + p.
    block_po = jax.lax.broadcasted_iota(jnp.int32, (p, o), 1) * p + jax.lax.broadcasted_iota(jnp.int32, (p, o), 0)
    scale = jnp.take(jnp.asarray(self.absmax_scale), block_po // DQ_GROUP, axis=-1, mode="clip")  # [..., P, O]
    # bitsandbytes rounds code * scale, then adds the offset. XLA fuses a multiply-add into one
    # FMA (one rounding), but not across this clip, a no-op on the finite product.
    finite = float(np.finfo(np.float32).max)
    centred = jnp.clip(_lookup(DYNAMIC_CODE, self.absmax_q) * scale, -finite, finite)
    return centred + jnp.asarray(self.absmax_offset)[..., None, None]

  def dequantize(self, dtype=jnp.float32) -> Array:
    """W [..., I, O] = level[code] * absmax in fp32, cast to `dtype`."""
    i, o = self.shape
    codes = jnp.asarray(self.codes)
    lead = codes.shape[:-2]
    q_io = jnp.stack([codes >> 4, codes & 0xF], axis=-2).reshape(*lead, i, o)
    levels = _lookup(NF4_LEVELS, q_io)
    p = i // self.block_size
    w = levels.reshape(*lead, p, self.block_size, o) * self.block_absmax()[..., :, None, :]
    return w.reshape(*lead, i, o).astype(dtype)


@struct.dataclass
class Int4Weight:
  """A symmetric int4 weight [..., I, O]: W = values * scale of its group of `group_size` inputs."""

  shape: tuple[int, int] = struct.field(pytree_node=False)
  group_size: int = struct.field(pytree_node=False)
  values: Any
  scales: Any

  def dequantize(self, dtype=jnp.float32) -> Array:
    """W [..., I, O] = values * scales in fp32, cast to `dtype`."""
    i, o = self.shape
    values = jnp.asarray(self.values)
    lead = values.shape[:-2]
    g = i // self.group_size
    w = values.astype(jnp.float32).reshape(*lead, g, self.group_size, o) * jnp.asarray(self.scales)[..., :, None, :]
    return w.reshape(*lead, i, o).astype(dtype)


QuantizedWeight = NF4Weight | Int4Weight


def _nf4_matrix(w_io, block_size: int, double_quant: bool, xp) -> dict[str, Any]:
  """NF4 leaves of one fp32 matrix [I, O]; `xp` is numpy (host) or jax.numpy (init)."""
  i, o = w_io.shape
  p = i // block_size
  w_pko = w_io.reshape(p, block_size, o)
  absmax_po = xp.abs(w_pko).max(axis=1)
  # As bitsandbytes: scale by the fp32 reciprocal (a product, not a quotient).
  inv_po = np.float32(1) / xp.maximum(absmax_po, np.float32(1e-38))
  scaled_io = xp.clip(w_pko * inv_po[:, None, :], np.float32(-1), np.float32(1)).reshape(i, o)
  q_io = xp.zeros((i, o), xp.uint8)
  for mid in _NF4_MIDPOINTS:  # 15 passes over uint8, not a 16-way broadcast
    q_io += scaled_io > mid
  del scaled_io
  codes = (q_io[0::2] << 4) | q_io[1::2]  # [I/2, O]
  if not double_quant:
    return {"codes": codes, "absmax": absmax_po}

  flat = absmax_po.T.reshape(-1)  # bitsandbytes' block order, [O * P]
  n = flat.shape[0]
  # bitsandbytes' torch mean, bit for bit; under jit (init_fn's random weights) XLA's own sum.
  offset = _torch_mean(flat) if xp is np else flat.sum() / np.float32(n)
  groups = -(-n // DQ_GROUP)
  # A short last group has its own absmax: the zero padding never raises it.
  centred = xp.pad(flat - offset, (0, groups * DQ_GROUP - n)).reshape(groups, DQ_GROUP)
  scale_g = xp.abs(centred).max(axis=1)
  inv_g = np.float32(1) / xp.where(scale_g > 0, scale_g, np.float32(1))
  x = xp.clip(centred * inv_g[:, None], np.float32(-1), np.float32(1))
  grid = (x + np.float32(1)) * np.float32(0.5) * np.float32(_LUT_SIZE - 1) + np.float32(0.5)
  q = xp.asarray(_DYNAMIC_LUT)[grid.astype(xp.uint16)]
  q = xp.where(scale_g[:, None] > 0, q, xp.uint8(0))  # bitsandbytes writes code 0 for an all-zero group
  return {"codes": codes, "absmax_q": q.reshape(-1)[:n].reshape(o, p).T, "absmax_scale": scale_g,
          "absmax_offset": xp.asarray(offset, xp.float32)}


def _int4_matrix(w_io, group_size: int, xp) -> dict[str, Any]:
  """Int4 leaves of one fp32 matrix [I, O]: q = round(w / scale), scale = group absmax / 7."""
  i, o = w_io.shape
  w_gko = w_io.reshape(i // group_size, group_size, o)
  scale_go = xp.abs(w_gko).max(axis=1) / np.float32(7)
  safe_go = xp.where(scale_go > 0, scale_go, np.float32(1))
  q = xp.clip(xp.round(w_gko / safe_go[:, None, :]), -8, 7).reshape(i, o).astype(xp.int8)
  return {"values": q.astype(ml_dtypes.int4 if xp is np else jnp.int4), "scales": scale_go}


def _matrix_leaves(w_io, spec: QuantSpec, xp) -> dict[str, Any]:
  if spec.type == "nf4":
    return _nf4_matrix(w_io, spec.block_size, spec.double_quant, xp)
  return _int4_matrix(w_io, spec.block_size, xp)


def _node(spec: QuantSpec, shape: tuple[int, int], leaves: dict[str, Any]) -> QuantizedWeight:
  if spec.type == "nf4":
    return NF4Weight(shape=shape, block_size=spec.block_size, double_quant=spec.double_quant, **leaves)
  return Int4Weight(shape=shape, group_size=spec.block_size, **leaves)


def quantize(w: np.ndarray, spec: QuantSpec, name: str = "weight") -> QuantizedWeight | np.ndarray:
  """Quantizes a kernel [..., I, O] on the host; every [I, O] matrix gets its own statistics.

  "none" returns `w` unchanged. `name` (the tensor's name) goes into error messages.
  """
  if spec.type == "none":
    return w
  w = np.asarray(w)
  if w.ndim < 2:
    raise UserError(f"{name}: cannot quantize a tensor of shape {w.shape}; expected [..., in, out]")
  spec.validate(w.shape[-2], name)
  w = w.astype(np.float32, copy=False)
  lead = w.shape[:-2]
  per_matrix = [_matrix_leaves(w[index], spec, np) for index in np.ndindex(*lead)]
  leaves = {k: np.asarray(np.stack([m[k] for m in per_matrix]).reshape(lead + np.shape(per_matrix[0][k])), order="C")
            for k in per_matrix[0]}
  return _node(spec, tuple(w.shape[-2:]), leaves)


def dequantize(kernel, dtype=jnp.float32) -> Array:
  """A dense kernel [..., I, O] in `dtype` from a quantized node or a plain array."""
  if isinstance(kernel, (NF4Weight, Int4Weight)):
    return kernel.dequantize(dtype)
  return jnp.asarray(kernel).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: Array, kernel: QuantizedWeight, dtype) -> Array:
  """x [..., I] @ W [I, O] in `dtype` for a 4-bit kernel.

  Autodiff of `x @ dequantize(kernel)` saves the dense W for dx = dy W^T, and no
  `jax.checkpoint` around the dequantization can stop it: the saved value is the dot's
  input. Here the backward keeps x and the kernel (its 4-bit leaves) and rebuilds W.
  The kernel is frozen: its cotangent is zero.
  """
  return jnp.dot(x.astype(dtype), kernel.dequantize(dtype))


def _matmul_fwd(x, kernel, dtype):
  return matmul(x, kernel, dtype), (x, kernel)


def _matmul_bwd(dtype, residuals, dy):
  x, kernel = residuals
  w = kernel.dequantize(dtype)
  # dy [..., O] contracted with W's O axis: dx = dy W^T without a transposed copy of W.
  dx = jax.lax.dot_general(dy.astype(dtype), w, (((dy.ndim - 1,), (1,)), ((), ())))
  return dx.astype(x.dtype), None


matmul.defvjp(_matmul_fwd, _matmul_bwd)


_WEIGHT_LIKE = ("codes", "absmax", "absmax_q", "values", "scales")  # take the weight's axis names


def partitioned(node, axes: Sequence[str | None]):
  """Wraps each array leaf of `node` in nn.LogicallyPartitioned for a weight with logical `axes`.

  `axes` names the dense weight's axes, e.g. ("embed", "mlp") or ("layers", "embed", "mlp").
  Leaves laid out like the weight take these names; the per-matrix statistics
  (absmax_scale, absmax_offset) take the leading names and stay replicated elsewhere.
  A plain array is boxed whole.
  """
  axes = tuple(axes)
  if not isinstance(node, (NF4Weight, Int4Weight)):
    return nn.LogicallyPartitioned(node, axes)
  lead = axes[:-2]

  def box(field: str, leaf):
    names = axes if field in _WEIGHT_LIKE else lead + (None,) * (len(leaf.shape) - len(lead))
    if len(names) != len(leaf.shape):
      raise ValueError(f"{field} has shape {leaf.shape} but the weight's axes are {axes}")
    return nn.LogicallyPartitioned(leaf, names)

  return node.replace(**{f.name: box(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)
                         if f.metadata.get("pytree_node", True) and getattr(node, f.name) is not None})


def init_fn(spec: QuantSpec, axes: Sequence[str | None],
            base_init: Callable = nn.initializers.lecun_normal()) -> Callable:
  """An initializer (rng, shape, dtype) -> boxed weight, for `self.param(name, init_fn(...), (I, O))`.

  It quantizes a `base_init` random weight with jnp, so it traces under jit and
  jax.eval_shape. For a quantized spec `dtype` is ignored: the format fixes the dtypes.
  """
  if spec.type == "none":
    return nn.with_logical_partitioning(base_init, tuple(axes))

  def init(rng, shape, dtype=jnp.float32):
    del dtype
    shape = tuple(shape)
    spec.validate(shape[-2])
    fn = lambda m: _matrix_leaves(m, spec, jnp)
    for _ in shape[:-2]:
      fn = jax.vmap(fn)
    leaves = fn(base_init(rng, shape, jnp.float32))
    return partitioned(_node(spec, shape[-2:], leaves), axes)

  return init


def _bits(dtype) -> int:
  dtype = np.dtype(dtype)
  for info in (ml_dtypes.iinfo, ml_dtypes.finfo):
    try:
      return info(dtype).bits
    except ValueError:
      pass
  return dtype.itemsize * 8


def nbytes(tree) -> int:
  """Bytes of the arrays in `tree` (boxed or not), counting int4 as half a byte.

  XLA's CPU backend keeps int4 one per byte (`Array.nbytes` says so too); TPU and
  GPU pack two per byte, and this counts the packed size.
  """
  bits = sum(math.prod(x.shape) * _bits(x.dtype) for x in jax.tree.leaves(tree)
             if hasattr(x, "shape") and hasattr(x, "dtype"))
  return (bits + 7) // 8
