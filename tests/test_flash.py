"""The flash (blockwise, run-time mask) attention kernels against the plain `model.attention`.

On this CPU the kernels run in Pallas interpret mode: the same kernel programs, evaluated with XLA ops.
Errors are relative, max|a - b| / max|b|, outputs over the positions a loss can read (segment != 0),
gradients over whole tensors (the cotangent is zero on padding queries). Tolerances: fp32 1e-5 (only the
summation order differs); bf16 2e-2 (a few bf16 roundings, 2^-8 each, of the probabilities and of the
score gradients, in a different order than the plain path's).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anita_jax.data import preference as PR
from anita_jax.errors import UserError
from anita_jax.model import attention as AT
from anita_jax.model import flash as FL
from anita_jax.model import flash_tiles as FT
from anita_jax.model import sharding as S

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
BLOCKS = (128, 128)  # small tiles, so that rows of 256-384 tokens have several


def rel_err(a, b, valid=None):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if valid is not None:
    a, b = a[valid], b[valid]
  return float(np.abs(a - b).max() / np.abs(b).max())


def dpo_rows(t=384):
  """Packed DPO rows as data.preference packs them: (prompt, chosen, rejected) lengths per pair."""
  pairs = [[(90, 40, 70), (12, 1, 1), (30, 20, 60)],  # a long (system, multi-turn) prompt; 1-token
           [(100, 156, 128)],                         # completions; a rejected longer than its chosen;
           []]                                        # a row filled exactly to T; a padding row
  examples, groups = [], []
  for row in pairs:
    groups.append([])
    for lengths in row:
      groups[-1].append(len(examples))
      examples.append(PR.PreferenceExample(*(np.arange(n, dtype=np.int32) for n in lengths)))
  batch = PR.build_packed_batch(examples, groups, t)
  assert (batch["segment_ids"][1] != 0).all() and not batch["segment_ids"][2].any()
  return batch["segment_ids"], batch["branch_ids"]


def segment_rows(kind, b, t):
  seg = np.ones((b, t), np.int32)
  if kind == "packed":  # row 0: three sequences then padding; row 1: an id used again after another one
    seg[0, 11:], seg[0, 150:], seg[0, t - 9:] = 2, 3, 0
    seg[1, :128], seg[1, 128:], seg[1, 320:] = 5, 7, 5  # 320.. see 0..127 (kv tile 0) across segment 7
  return seg, None


def inputs(n, k, h, b, t, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, t, heads, h)), dtype) for heads in (n, k, k))


def outputs_and_grads(fn, q, k, v, valid):
  """fn's output and (dq, dk, dv) of sum(out * w), w random on the rows a loss reads, 0 on padding."""
  w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape) * valid[:, :, None, None], q.dtype)
  f = jax.jit(fn)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum((f(q, k, v) * w).astype(jnp.float32)), argnums=(0, 1, 2)))
  return f(q, k, v), grads(q, k, v)


def flash(seg, branch):
  seg, branch = jnp.asarray(seg), None if branch is None else jnp.asarray(branch)
  return lambda q, k, v: FL.flash_attention(q, k, v, seg, branch, blocks=BLOCKS)


def plain(seg, branch):
  seg, branch = jnp.asarray(seg), None if branch is None else jnp.asarray(branch)
  return lambda q, k, v: AT.attention(q, k, v, seg, seg, 0, branch, branch)


def dense_tiles(seg, branch, block):
  """bool [B, T/block, T/block]: tiles holding a visible (query, key), from the whole [T, T] mask."""
  b, t = seg.shape
  branch = np.zeros_like(seg) if branch is None else branch
  s = np.arange(t)
  mask = ((s[None, :] <= s[:, None])[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
          & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))
  return mask.reshape(b, t // block, block, t // block, block).any(axis=(2, 4))


@pytest.mark.parametrize("kind, n, k, t, dtype", [
    ("causal", 2, 2, 256, jnp.float32), ("packed", 4, 2, 384, jnp.float32), ("dpo", 4, 2, 384, jnp.float32),
    ("dpo", 4, 4, 384, jnp.bfloat16), ("packed", 2, 2, 200, jnp.bfloat16)],
    ids=["causal", "packed-gqa", "dpo-gqa", "dpo-bf16", "packed-bf16-unaligned"])
def test_outputs_and_gradients_equal_plain_attention(kind, n, k, t, dtype):
  seg, branch = dpo_rows(t) if kind == "dpo" else segment_rows(kind, 2, t)
  q, key, value = inputs(n, k, 32, seg.shape[0], t, dtype)
  valid = seg != 0
  out, grads = outputs_and_grads(flash(seg, branch), q, key, value, valid)
  ref, ref_grads = outputs_and_grads(plain(seg, branch), q, key, value, valid)
  tol = TOLERANCE[dtype]
  assert out.shape == ref.shape and out.dtype == ref.dtype
  assert np.isfinite(np.asarray(out, np.float32)).all()  # padding rows too
  assert rel_err(out, ref, valid) <= tol
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert g.dtype == r.dtype and rel_err(g, r) <= tol, name


def test_dead_tiles_are_skipped():
  seg, branch = dpo_rows(384)
  live = np.asarray(FT.live_tiles(seg, branch, *BLOCKS))
  visible = dense_tiles(seg, branch, 128)
  # Exactly the tiles with a visible pair (here; in general a superset): the padding row computes none, and
  # the exactly filled row (prompt 0-99, chosen 100-255, rejected 256-383) skips its rejected queries
  # against the chosen-only tile; row 0 skips its third pair's queries against the first pair's tile 0.
  assert (live == visible).all() and not live[2].any() and not live[1, 2, 1] and not live[0, 2, 0]
  assert live.sum() == 10 < 3 * 6 < 3 * 9  # below the causal count, itself below the full count
  # Skipped tiles are not computed at all: NaN keys and values in the padding row, whose tiles are all
  # dead, would turn any computed output or gradient into NaN (0 * NaN); the reference gets clean inputs.
  q, key, value = inputs(4, 2, 32, 3, 384, jnp.float32)
  key_nan, value_nan = key.at[2].set(jnp.nan), value.at[2].set(jnp.nan)
  valid = seg != 0
  out, grads = outputs_and_grads(flash(seg, branch), q, key_nan, value_nan, valid)
  ref, ref_grads = outputs_and_grads(plain(seg, branch), q, key, value, valid)
  assert np.isfinite(np.asarray(out)).all() and rel_err(out, ref, valid) <= TOLERANCE[jnp.float32]
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert np.isfinite(np.asarray(g)).all() and rel_err(g, r) <= TOLERANCE[jnp.float32], name


def test_live_tiles_of_causal_and_packed_rows():
  causal = np.asarray(FT.live_tiles(np.ones((1, 384), np.int32), None, *BLOCKS))
  assert (causal[0] == np.tril(np.ones((3, 3), bool))).all()  # 6 of 9: on and below the diagonal
  seg = np.zeros((1, 512), np.int32)
  seg[0, :200], seg[0, 200:400] = 1, 2  # the second sequence's queries in tiles 2-3 never see tile 0
  live = np.asarray(FT.live_tiles(seg, None, *BLOCKS))
  assert (live == dense_tiles(seg, None, 128)).all() and live.sum() == 8 and not live[0, 2:, 0].any()
  seg, _ = segment_rows("packed", 2, 384)  # a reused segment id: tile 0 is live for the last query tile
  assert np.asarray(FT.live_tiles(seg, None, *BLOCKS))[1, 2, 0] and dense_tiles(seg, None, 128)[1, 2, 0]


def test_cost_counts_the_products_xla_counts():
  # One live [128, 128] tile over N heads: the forward's 2 products, dq's 3 and dk/dv's 4, as XLA counts
  # the same einsums of [N, 128, H] operands.
  n, kv, h, block = 4, 2, 64, 128
  x = jax.ShapeDtypeStruct((n, block, h), jnp.float32)
  s = jax.ShapeDtypeStruct((n, block, block), jnp.float32)
  qk = jax.jit(lambda a, b: jnp.einsum("nqh,nkh->nqk", a, b)).lower(x, x).compile().cost_analysis()["flops"]
  pv = jax.jit(lambda p, b: jnp.einsum("nqk,nkh->nqh", p, b)).lower(s, x).compile().cost_analysis()["flops"]
  assert qk == pv
  one = FT.cost(np.ones((1, 1, 1), bool), block, block, n, kv, h, 4)
  assert one["forward"]["flops"] == 2 * qk and one["dq"]["flops"] == 3 * qk and one["dkv"]["flops"] == 4 * qk
  causal = FT.cost(np.tril(np.ones((2, 3, 3), bool)), block, block, n, kv, h, 4)
  assert causal["forward"]["flops"] == 2 * 6 * one["forward"]["flops"]  # 2 rows of 6 live tiles


def test_sharded_over_an_8_device_mesh_equals_plain():
  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  seg, branch = dpo_rows(128 * 3)
  seg, branch = np.concatenate([seg, seg[:1]]), np.concatenate([branch, branch[:1]])  # 4 rows
  q, key, value = inputs(4, 2, 32, 4, 384, jnp.float32)
  valid = seg != 0
  ref, ref_grads = outputs_and_grads(plain(seg, branch), q, key, value, valid)
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(flash(seg, branch))(q, key, value))
    assert "shard_map" in jaxpr and "'data', 'fsdp'" in jaxpr and "'tensor'" in jaxpr
    out, grads = outputs_and_grads(flash(seg, branch), q, key, value, valid)
  assert rel_err(out, ref, valid) <= TOLERANCE[jnp.float32]
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert rel_err(g, r) <= TOLERANCE[jnp.float32], name


def test_check_refuses_what_the_kernel_cannot_take_in_one_line():
  for head_dim in (64, 128, 256):
    FL.check(head_dim, 8192, jnp.bfloat16)
  FL.check(64, 100, jnp.float32)
  for args in ((100, 1024, jnp.bfloat16), (192, 1024, jnp.bfloat16), (512, 1024, jnp.float32),
               (64, 1024, jnp.float16)):
    with pytest.raises(UserError) as e:
      FL.check(*args)
    assert str(e.value).startswith("config field 'model.attention'=flash: ") and "\n" not in str(e.value)


def test_block_rule():
  assert [FT.block_sizes(t)[0] for t in (8, 128, 130, 511, 512, 1000, 8192)] == [128, 128, 256, 512, 512, 512, 512]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed: no compile-only "
                    "TPU devices")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tpu_lowering_compiles_for_v5e(head_dim):
  """Mosaic compiles the three kernels (forward, dq, dk/dv) for a v5e chip, bf16, two 512-token tiles per row."""
  from anita_jax.train.topology import topology_devices  # noqa: PLC0415 - only where libtpu is present

  mesh = jax.sharding.Mesh(np.array(topology_devices("v5e:1x1")).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
  b, t, n, k = 2, 1024, 4, 2
  args = (spec((b, t, n, head_dim), jnp.bfloat16), spec((b, t, k, head_dim), jnp.bfloat16),
          spec((b, t, k, head_dim), jnp.bfloat16), spec((b, t), jnp.int32), spec((b, t), jnp.int32))
  loss = lambda *a: jnp.sum(FL.flash_attention(*a).astype(jnp.float32))  # noqa: E731
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile()
  text = compiled.as_text()
  assert text.count("tpu_custom_call") == 3, "forward, dq and dk/dv kernels"
  # XLA counts the kernels by their cost estimate: the causal tiles (3 of 4 per row and head).
  tile = 2 * 512 * 512 * head_dim
  assert compiled.cost_analysis()["flops"] >= (2 + 3 + 4) * tile * 3 * b * n


def test_a_stage_the_kernel_cannot_take_is_one_error_line_before_compiling(demo_config):
  import dataclasses

  from anita_jax.model import config as cfg
  from anita_jax.train import config as C
  from anita_jax.train import state as ST
  c = demo_config("dpo")
  c.model.attention, c.data.packing = "flash", True
  c = C.freeze(c)
  spec = ST.lora_spec(c)
  ST.make_model(c, cfg.PRESETS["tiny"], spec)  # head_dim 16: taken
  with pytest.raises(UserError) as e:
    ST.make_model(c, dataclasses.replace(cfg.PRESETS["tiny"], head_dim=12), spec)
  assert str(e.value).startswith("config field 'model.attention'=flash: head_dim 12") and "\n" not in str(e.value)
