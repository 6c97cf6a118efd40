"""anita_jax.model.quant against bitsandbytes (NF4, double quantization), torch (the offset's
summation order) and float64 numpy (int4).

bitsandbytes works on the HF layout [O, I]; our kernels are its transpose [I, O]. Its
packed bytes, flattened row-major over [O, I/2], are our codes [I/2, O] transposed.
"""

import time

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch
from bitsandbytes import functional as bnbf

from anita_jax.model import quant
from anita_jax.model.config import PROJECTIONS
from anita_jax.errors import UserError

NF4 = quant.QuantSpec("nf4", 64, double_quant=False)
NF4_DQ = quant.QuantSpec("nf4", 64, double_quant=True)


def _torch_lanes() -> int:
  """torch's Vectorized<float> width for its sum kernels (bitsandbytes' offset is a torch mean summed in
  these lanes): 8 (AVX2) or 16 (AVX-512). `get_cpu_capability()` does not tell: it reports AVX512 on AMD
  EPYC hosts whose reductions run 8 lanes. One probe sum where the two orders round differently decides."""
  x = (np.random.default_rng(1).random(4099) * 300 + 0.3).astype(np.float32)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    ref = torch.from_numpy(x).mean().numpy()
  finally:
    torch.set_num_threads(threads)
  by_lanes = {lanes: quant._torch_mean(x, lanes=lanes) for lanes in (8, 16)}
  assert by_lanes[8] != by_lanes[16]  # the probe tells the two apart
  return next((lanes for lanes, mean in by_lanes.items() if mean == ref), 0)


TORCH_LANES = _torch_lanes()
sums_like_torch = pytest.mark.skipif(
    TORCH_LANES != quant._TORCH_LANES,
    reason=f"torch sums {TORCH_LANES} floats per vector here; quant reproduces {quant._TORCH_LANES}")
jit_dequantize = jax.jit(lambda node: node.dequantize(jnp.float32))


def _bnb(w_oi: np.ndarray, double_quant: bool):
  """bitsandbytes' NF4 of an HF-layout [O, I] weight: (codes [I/2, O], dequantized [I, O], state)."""
  o, i = w_oi.shape
  packed, state = bnbf.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w_oi)), blocksize=64,
                                     quant_type="nf4", compress_statistics=double_quant)
  dense_oi = bnbf.dequantize_4bit(packed, state).numpy()
  return packed.numpy().reshape(o, i // 2).T, dense_oi.T, state


def _assert_bits(ours, ref):
  """Equal to the last bit (fp32 compared as integers, so -0.0 != 0.0 and a NaN would show)."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ours.dtype, ref.shape, ref.dtype)
  if ours.dtype == np.float32:
    ours, ref = ours.view(np.uint32), ref.view(np.uint32)
  np.testing.assert_array_equal(ours, ref)


def _assert_dq_is_bitsandbytes(node: quant.NF4Weight, w_oi: np.ndarray, dense_io=None):
  """Every stored array of a double-quantized node, and its dequantized weight, against bitsandbytes."""
  o, i = w_oi.shape
  ref_codes, ref_io, state = _bnb(w_oi, double_quant=True)
  _assert_bits(node.codes, ref_codes)
  _assert_bits(node.absmax_q, state.absmax.numpy().reshape(o, i // 64).T)
  _assert_bits(node.absmax_scale, state.state2.absmax.numpy())
  _assert_bits(node.absmax_offset, state.offset.numpy())
  _assert_bits(jit_dequantize(node) if dense_io is None else dense_io, ref_io)
  return state


def _block_absmax_io(w_oi: np.ndarray) -> np.ndarray:
  """The true absmax of each element's block, broadcast to [I, O]."""
  o, i = w_oi.shape
  absmax_op = np.abs(w_oi.reshape(o, i // 64, 64)).max(axis=-1)
  return np.repeat(absmax_op.T, 64, axis=0)


def _dyadic_normal(rng, shape, scale=64, unit=2.0 ** -11):
  """Normal-ish weights on a grid of `unit`: any order of summing their block absmax is exact in fp32,
  so bitsandbytes' offset does not depend on torch's vector width or thread count."""
  return (np.round(rng.standard_normal(shape) * scale) * unit).astype(np.float32)


def test_dynamic_code_is_bitsandbytes():
  np.testing.assert_array_equal(quant.DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True).numpy())
  np.testing.assert_array_equal(quant.NF4_LEVELS, bnbf.get_4bit_type("nf4", device="cpu").numpy())


@pytest.mark.parametrize("o,i", [(1536, 576), (576, 1536), (96, 128), (250, 64)])
def test_nf4_codes_and_dequant_match_bitsandbytes(o, i):
  w_oi = (np.random.default_rng(o + i).standard_normal((o, i)) * 0.02).astype(np.float32)
  ref_codes, ref_io, state = _bnb(w_oi, double_quant=False)
  node = quant.quantize(w_oi.T.copy(), NF4)
  assert node.codes.dtype == np.uint8 and node.codes.shape == (i // 2, o)
  assert node.absmax.dtype == np.float32 and node.absmax.shape == (i // 64, o)
  _assert_bits(node.codes, ref_codes)
  _assert_bits(node.absmax, state.absmax.numpy().reshape(o, i // 64).T)
  _assert_bits(jit_dequantize(node), ref_io)


def test_nf4_tie_goes_to_the_lower_level_as_bitsandbytes():
  # Every block's absmax is 1, so the scaled values are the midpoints themselves.
  levels = quant.NF4_LEVELS
  mids = ((levels[:-1] + levels[1:]) / np.float32(2)).astype(np.float32)
  row = np.concatenate([[1.0], np.resize(mids, 63)]).astype(np.float32)
  w_oi = np.stack([row, -row, row[::-1].copy(), row]).astype(np.float32)  # [4, 64]
  ref_codes, _, _ = _bnb(w_oi, double_quant=False)
  node = quant.quantize(w_oi.T.copy(), NF4)
  np.testing.assert_array_equal(node.codes, ref_codes)
  first = np.asarray(node.codes)[:, 0]
  q = np.stack([first >> 4, first & 15], axis=-1).reshape(-1)
  assert q[0] == 15 and q[1:16].tolist() == list(range(15))  # midpoint k -> level k, the lower one


def test_offset_is_torch_mean_bit_for_bit():
  """bitsandbytes' offset is torch's fp32 `absmax.mean()`, not the correctly rounded mean.

  Sizes cover the scalar path (< 8), the cascade's levels, SmolLM2's block counts (1728,
  5184, 13824) and, above torch's grain of 32768, the split over threads.
  """
  rng = np.random.default_rng(0)
  threads = torch.get_num_threads()
  not_rounded = 0
  try:
    for torch_threads in sorted({1, threads}):
      torch.set_num_threads(torch_threads)
      for n in (1, 7, 8, 31, 64, 257, 1023, 1728, 5184, 13824, 32767, 40000, 131101):
        for scale in (1.0, 0.01, 300.0):
          x = (rng.random(n) * scale + 0.3).astype(np.float32)
          ref = torch.from_numpy(x).mean().numpy()
          _assert_bits(quant._torch_mean(x, lanes=TORCH_LANES, threads=torch_threads), ref)
          not_rounded += np.float32(x.astype(np.float64).mean()) != ref
  finally:
    torch.set_num_threads(threads)
  assert not_rounded > 0


@pytest.fixture(scope="module")
def smollm2_kernels(smollm2_gguf):
  """{(layer, projection): fp32 kernel [I, O]} of the real SmolLM2-135M-Instruct weights."""
  from anita_jax.convert.loading import load_weights
  config, params = load_weights(smollm2_gguf, scan_layers=False)
  kernels = {}
  for layer in range(config.num_layers):
    for block in ("self_attn", "mlp"):
      for name, leaf in params[f"layers_{layer}"][block].items():
        if name in PROJECTIONS:
          kernels[layer, name] = np.asarray(leaf["kernel"], np.float32)
  assert len(kernels) == 7 * config.num_layers == 210
  return kernels


@pytest.mark.slow
@sums_like_torch
def test_nf4_dq_real_smollm2_weights_are_bitsandbytes_bit_for_bit(smollm2_kernels):
  """Every projection of every layer: codes, absmax codes, group scales, offset, dequantized weight.

  Layer 0's up_proj has a block (4006) whose scaled centred absmax sits 3e-7 from a bin edge of
  bitsandbytes' 8-bit quantizer: the correctly rounded offset, one ulp off torch's mean, moved it
  into the next code.
  """
  start, cpu = time.perf_counter(), time.process_time()
  mean_is_not_rounded = 0
  for (layer, name), w_io in sorted(smollm2_kernels.items()):
    w_oi = np.ascontiguousarray(w_io.T)  # HF layout: bitsandbytes' blocks run along each row
    node = quant.quantize(w_io, NF4_DQ, name=f"layers.{layer}.{name}")
    state = _assert_dq_is_bitsandbytes(node, w_oi)
    absmax = np.abs(w_oi.reshape(-1, 64)).max(axis=-1)
    mean_is_not_rounded += np.float32(absmax.astype(np.float64).mean()) != state.offset.numpy()
  print(f"{len(smollm2_kernels)} projections against bitsandbytes in {time.perf_counter() - start:.1f} s "
        f"({time.process_time() - cpu:.1f} s CPU); "
        f"{mean_is_not_rounded} offsets differ from the correctly rounded mean")
  assert mean_is_not_rounded > 0


@pytest.mark.parametrize("o,i", [(1536, 576), (300, 128), (40, 64)])
def test_double_quant_shapes_and_short_groups_match_bitsandbytes(o, i):
  # (300, 128): 600 blocks, a short last group of 88; (40, 64): one short group.
  w_oi = _dyadic_normal(np.random.default_rng(o * i), (o, i))
  node = quant.quantize(w_oi.T.copy(), NF4_DQ)
  groups = -(-(o * i // 64) // 256)
  assert node.absmax_q.dtype == np.uint8 and node.absmax_q.shape == (i // 64, o)
  assert node.absmax_scale.dtype == np.float32 and node.absmax_scale.shape == (groups,)
  assert node.absmax_offset.dtype == np.float32 and node.absmax_offset.shape == ()
  _assert_dq_is_bitsandbytes(node, w_oi)


def test_double_quant_all_zero_group_matches_bitsandbytes():
  # 512 blocks whose absmax all equal the mean: every centred absmax of both groups is 0.
  w_oi = np.full((512, 64), 0.25, np.float32)
  node = quant.quantize(w_oi.T.copy(), NF4_DQ)
  assert np.all(node.absmax_scale == 0)
  _assert_dq_is_bitsandbytes(node, w_oi)


def test_double_quant_8bit_rounding_is_bitsandbytes_not_plain_nearest():
  """bitsandbytes' CPU 8-bit quantizer snaps to a 65536-point grid first; so must we."""
  rng = np.random.default_rng(7)
  o, i = 4096, 128  # 8192 blocks whose absmax is spread evenly over [0.05, 0.25)
  w_oi = _dyadic_normal(rng, (o, i), scale=16, unit=2.0 ** -13)
  w_oi.reshape(o, i // 64, 64)[:, :, 0] = rng.integers(410, 2048, (o, i // 64)) * 2.0 ** -13
  node = quant.quantize(w_oi.T.copy(), NF4_DQ)
  state = _assert_dq_is_bitsandbytes(node, w_oi)
  # The data reaches the cases where the grid and the plain nearest code disagree.
  ref_q = state.absmax.numpy()
  code = quant.DYNAMIC_CODE.astype(np.float64)
  absmax = np.abs(w_oi.reshape(-1, 64)).max(-1).astype(np.float64)
  centred = (absmax - state.offset.item()).reshape(-1, 256)
  x = centred / np.abs(centred).max(-1, keepdims=True)
  nearest = np.abs(x.reshape(-1, 1) - code).argmin(-1)
  assert (nearest != ref_q).sum() > 0


def test_stacked_layers_quantize_independently_and_dequantize_under_jit():
  layers, i, o = 3, 128, 192
  w_lio = np.stack([_dyadic_normal(np.random.default_rng(l), (i, o), scale=16 * (l + 1)) for l in range(layers)])
  node = quant.quantize(w_lio, NF4_DQ)
  assert node.shape == (i, o) and node.codes.shape == (layers, i // 2, o)
  assert node.absmax_scale.shape == (layers, 2) and node.absmax_offset.shape == (layers,)
  stacked = np.asarray(jit_dequantize(node))
  for l in range(layers):
    _assert_dq_is_bitsandbytes(jax.tree.map(lambda leaf, l=l: leaf[l], node), w_lio[l].T, dense_io=stacked[l])
  assert jax.jit(lambda n: n.dequantize(jnp.bfloat16))(node).dtype == jnp.bfloat16


def test_init_fn_quantizes_like_bitsandbytes():
  key = jax.random.key(3)
  i, o = 256, 384
  w_io = np.asarray(nn.initializers.lecun_normal()(key, (i, o), jnp.float32))
  for spec in (NF4, NF4_DQ):
    node = nn.unbox(jax.jit(lambda k, spec=spec: quant.init_fn(spec, ("embed", "mlp"))(k, (i, o)))(key))
    ref_codes, ref_io, state = _bnb(w_io.T, spec.double_quant)
    _assert_bits(node.codes, ref_codes)
    if not spec.double_quant:
      _assert_bits(node.absmax, state.absmax.numpy().reshape(o, i // 64).T)
      _assert_bits(jit_dequantize(node), ref_io)
      continue
    # Traced, the offset is XLA's sum, not torch's: it may be an ulp or two off, and a block whose
    # centred absmax sits on a bin edge of the 8-bit quantizer may then take the neighbouring code.
    ulps = np.asarray(node.absmax_offset).view(np.int32).astype(int) - state.offset.numpy().view(np.int32)
    assert abs(ulps) <= 2
    ref_q_po = state.absmax.numpy().reshape(o, i // 64).T
    flipped_po = np.asarray(node.absmax_q) != ref_q_po
    assert flipped_po.mean() <= 1e-3
    assert np.all(np.abs(np.asarray(node.absmax_q)[flipped_po].astype(int) - ref_q_po[flipped_po]) == 1)
    keep_io = ~np.repeat(flipped_po, 64, axis=0)
    err_io = np.abs(np.asarray(jit_dequantize(node)) - ref_io)
    assert np.all(err_io[keep_io] <= 1e-5 * _block_absmax_io(w_io.T)[keep_io])


def test_bytes_per_parameter():
  # The stored arrays against bitsandbytes' own state on a small matrix ...
  w_oi = (np.random.default_rng(0).standard_normal((576, 1536)) * 0.02).astype(np.float32)
  packed, state = bnbf.quantize_4bit(torch.from_numpy(w_oi), blocksize=64, quant_type="nf4", compress_statistics=True)
  bnb_bytes = (packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() + 4)
  assert quant.nbytes(quant.quantize(w_oi.T.copy(), NF4_DQ)) == bnb_bytes
  # ... and the QLoRA figures (4.5 and 4 + 8/64 + 32/(64*256) bits) on a 4096 x 14336 projection.
  w_io = np.random.default_rng(1).standard_normal((4096, 14336), dtype=np.float32)
  n = w_io.size
  figures = {name: quant.nbytes(quant.quantize(w_io, spec)) / n
             for name, spec in [("nf4", NF4), ("nf4+dq", NF4_DQ), ("int4", quant.QuantSpec("int4", 64))]}
  print("bytes/param (4096x14336):", {k: round(v, 5) for k, v in figures.items()})
  assert figures["nf4"] == 4.5 / 8
  assert figures["nf4+dq"] == pytest.approx((4 + 8 / 64 + 32 / (64 * 256)) / 8 + 4 / n, rel=1e-12)
  assert figures["nf4+dq"] <= 0.52
  assert figures["int4"] == 4.5 / 8  # int4 codes, fp32 scale per 64


def test_int4_round_trip_against_float64():
  rng = np.random.default_rng(5)
  w_io = (rng.standard_normal((256, 96)) * 0.05).astype(np.float32)
  w_io[64:128, 3] = 0.0  # an all-zero group
  node = quant.quantize(w_io, quant.QuantSpec("int4", 64))
  values = jax.device_put(node.values)
  assert values.dtype == jnp.int4 and values.shape == (256, 96) and node.scales.shape == (4, 96)
  print("jax int4 Array.nbytes on CPU:", values.nbytes, "for", values.size, "elements;",
        "counted:", quant.nbytes(values))
  assert quant.nbytes(values) == values.size // 2

  w64 = w_io.astype(np.float64).reshape(4, 64, 96)
  scale64 = np.abs(w64).max(axis=1, keepdims=True) / 7
  ratio = np.divide(w64, scale64, out=np.zeros_like(w64), where=scale64 > 0)
  q64 = np.clip(np.round(ratio), -8, 7)
  near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5
  q = np.asarray(values.astype(jnp.int8)).reshape(4, 64, 96)
  np.testing.assert_array_equal(q[~near_tie], q64[~near_tie])
  np.testing.assert_allclose(node.scales, scale64[:, 0], rtol=1e-7, atol=0)
  dense = np.asarray(jax.jit(lambda n: n.dequantize(jnp.float32))(node.replace(values=values)))
  err = np.abs(dense.reshape(4, 64, 96) - w64)
  assert np.all(err <= scale64 / 2 * (1 + 1e-6))
  assert np.all(dense[64:128, 3] == 0)


def test_bad_spec_is_a_user_error():
  w = np.zeros((96, 8), np.float32)
  with pytest.raises(UserError, match="quant.block_size"):
    quant.quantize(w, quant.QuantSpec("nf4", 64), name="layers.0.mlp.down_proj")
  with pytest.raises(UserError, match="quant.block_size"):
    quant.QuantSpec("int4", 64).validate(100)
  with pytest.raises(UserError, match="quant.block_size"):
    quant.QuantSpec("nf4", 0)
  with pytest.raises(UserError, match="quant.type"):
    quant.QuantSpec("nf5")
  assert quant.quantize(w, quant.QuantSpec("none")) is w


def test_scan_partitions_every_leaf():
  class QLinear(nn.Module):
    spec: quant.QuantSpec

    @nn.compact
    def __call__(self, x_bd, _):
      kernel = self.param("kernel", quant.init_fn(self.spec, ("embed", "mlp")), (128, 256))
      return x_bd @ quant.dequantize(kernel, x_bd.dtype)[:, :128], None

  class Stack(nn.Module):
    spec: quant.QuantSpec

    @nn.compact
    def __call__(self, x_bd):
      layers = nn.scan(QLinear, variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
                       metadata_params={nn.PARTITION_NAME: "layers"})(self.spec, name="layers")
      return layers(x_bd, None)[0]

  weight = jax.sharding.PartitionSpec("layers", "embed", "mlp")
  stats = {"absmax_scale": jax.sharding.PartitionSpec("layers", None),
           "absmax_offset": jax.sharding.PartitionSpec("layers")}
  x = jnp.ones((2, 128))
  for spec in (NF4_DQ, NF4, quant.QuantSpec("int4", 64)):
    model = Stack(spec)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    kernel = nn.get_partition_spec(abstract)["params"]["layers"]["kernel"]
    leaves = {f: getattr(kernel, f) for f in ("codes", "absmax", "absmax_q", "absmax_scale", "absmax_offset",
                                              "values", "scales") if getattr(kernel, f, None) is not None}
    assert leaves and all(v == stats.get(f, weight) for f, v in leaves.items()), leaves
    params = model.init(jax.random.key(0), x)
    unboxed = nn.unbox(params)["params"]["layers"]["kernel"]
    assert jax.tree.leaves(unboxed)[0].shape[0] == 3
    assert model.apply(params, x).shape == (2, 128)


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_sharded_dequantize_matches_bitsandbytes(axis_type):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
  rules = (("layers", None), ("embed", "data"), ("mlp", "model"))
  layers, i, o = 2, 256, 384
  w_lio = np.stack([_dyadic_normal(np.random.default_rng(10 + l), (i, o)) for l in range(layers)])
  boxed = quant.partitioned(quant.quantize(w_lio, NF4_DQ), ("layers", "embed", "mlp"))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  node = jax.device_put(nn.unbox(boxed), shardings)
  assert node.codes.sharding.spec == jax.sharding.PartitionSpec(None, "data", "model")
  dense = jit_dequantize(node)
  for l in range(layers):
    _, ref_io, _ = _bnb(w_lio[l].T, double_quant=True)
    _assert_bits(dense[l], ref_io)


def test_compiled_nf4_memory_does_not_grow_with_layers():
  """Forward and LoRA train step of an NF4 SmolLM2-shaped model, 2 vs 4 layers (memory_analysis):
  the forward's temporaries stay flat, and with remat the step grows by the per-layer residual
  stream only, far less than one layer of dequantized weights."""
  import dataclasses

  from anita_jax.model import config as cfg
  from anita_jax.model import lora
  from anita_jax.model import tree as PT
  from anita_jax.model import llama as M
  base = cfg.PRESETS["smollm2-135m"]
  tokens = jnp.zeros((4, 256), jnp.int32)
  temps = {}
  for layers in (2, 4):
    config = dataclasses.replace(base, num_layers=layers)
    net = M.Llama(config, lora=lora.make_spec(16, 32), quant=quant.QuantSpec("nf4"), remat_policy="full")
    params = nn.meta.unbox(jax.eval_shape(net.init, jax.random.key(0), tokens)["params"])
    trainable, frozen = PT.partition(params, PT.trainable_mask(params))
    loss = lambda t, f: net.apply({"params": PT.combine(t, f)}, tokens)[0].sum()
    fwd = jax.jit(lambda p: net.apply({"params": p}, tokens)[0]).lower(params).compile().memory_analysis()
    step = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile().memory_analysis()
    temps[layers] = (fwd.temp_size_in_bytes, step.temp_size_in_bytes)
  d = base
  one_layer = 4 * (d.hidden_size * d.head_dim * (2 * d.num_heads + 2 * d.num_kv_heads)
                   + 3 * d.hidden_size * d.intermediate_size)
  residual = 4 * 256 * d.hidden_size * 4  # [B, T, D] fp32 saved per layer by the remat'd scan
  print(f"temp bytes (forward, step): 2 layers {temps[2]}, 4 layers {temps[4]}; one layer dequantized "
        f"{one_layer}")
  assert temps[4][0] == temps[2][0]
  assert temps[4][1] - temps[2][1] <= 2 * residual * 1.1
  assert temps[4][1] - temps[2][1] < one_layer
