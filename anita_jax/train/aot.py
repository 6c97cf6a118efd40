"""Ahead-of-time compilation of a stage's training step for a Cloud TPU topology, on a CPU host.

libtpu provides compile-only TPU devices for a named topology ('v5e:2x4'); the
real jitted train step (`train.compile_step`) is lowered against abstract
state, frozen weights and batch carrying their shardings over a mesh of those
devices, and compiled by the TPU compiler. Nothing is executed and no weight is
read: the architecture comes from a preset (known hub ids) or a local config.

What the report holds and how it is derived:
- memory: `memory_analysis()` of the whole program, per device (reliable).
- FLOPs and bytes: `cost_analysis()` counts the body of a loop once, and the step
  has two (the gradient-accumulation scan and the layer scan). So the step's
  cost is rebuilt from two small programs with the layers unrolled and one
  micro-batch, L = 1 and 2 (cost(L) = a + b L, extrapolated to the model's L),
  times the micro-batches, minus the optimizer update counted once too often
  (compiled on its own). An analytic count (`flop_formula`) cross-checks it.
- time: a roofline estimate, max(FLOPs / peak, bytes / HBM bandwidth) per chip;
  collectives (their bytes are reported) and overlap are not in it.
- the 4-bit base: see `frozen_weights_check`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax

from anita_jax.convert import loading
from anita_jax.model import lora as LA
from anita_jax.model import quant as Q
from anita_jax.model import sharding as S
from anita_jax.model import splash
from anita_jax.train import config as stage_config
from anita_jax.train import loop as train
from anita_jax.model.config import PRESETS, ModelConfig
from anita_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip peak figures (one JAX device per chip: v4 and v5p run as megacore)."""

  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  megacore: bool = False


GiB = 2 ** 30
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2, 1200 GBps per chip.
    "v4": Chip(275e12, 32 * GiB, 1200e9, megacore=True),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB HBM2, 819 GBps per chip
    # (later revisions of the page print 800 GBps).
    "v5e": Chip(197e12, 16 * GiB, 819e9),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB HBM2e, 2765 GBps per chip.
    "v5p": Chip(459e12, 95 * GiB, 2765e9, megacore=True),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM, 1640 GBps per chip
    # (later revisions of the page print 1600 GBps).
    "v6e": Chip(918e12, 32 * GiB, 1640e9),
}
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}

# Hub ids whose architecture is a preset, so that no network is needed.
HUB_PRESETS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b",
    "meta-llama/Meta-Llama-3-8B": "llama3-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3.1-8b",
    "meta-llama/Llama-3.1-8B": "llama3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B": "llama3.1-8b",
    "meta-llama/Llama-3.2-1B-Instruct": "llama3.2-1b",
    "meta-llama/Llama-3.2-1B": "llama3.2-1b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    "embedded": "smollm2-135m",
}
BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """('v5e', (2, 4)) for 'v5e:2x4'; raises UserError naming --topology."""
  m = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", str(name or "").strip())
  chip = m and m.group(1)
  if not m or chip not in CHIPS:
    raise UserError(f"--topology={name!r}: expected CHIP:AxB[xC] with CHIP one of {', '.join(CHIPS)} "
                    "(e.g. v5e:1x1, v5e:2x4, v4:2x2x1, v5p:2x2x1)")
  dims = tuple(int(x) for x in m.group(2).split("x"))
  if len(dims) != _DIMS[chip] or min(dims) < 1:
    example = "x".join(["2"] * (_DIMS[chip] - 1) + ["1"])
    raise UserError(f"--topology={name!r}: a {chip} topology has {_DIMS[chip]} positive dimensions, "
                    f"e.g. {chip}:{example}")
  return chip, dims


def topology_devices(name: str) -> list:
  """The compile-only devices of a TPU topology (one per chip)."""
  chip, dims = parse_topology(name)
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(f"--topology={name}: compiling for TPU needs libtpu on this host; install the pin in "
                    "requirements.txt (pip install 'jax[tpu]==0.10.2')")
  # Only compiles happen here; let a second process (a test, a training run on the CPU) use libtpu too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  kwargs = {"chip_config_name": "megacore" if CHIPS[chip].megacore else "default"}
  if math.prod(dims) == 1:
    kwargs["chips_per_host_bounds"] = (1, 1, 1)  # libtpu's default host is larger than one chip
  try:
    return list(topologies.get_topology_desc(topology_name=f"{chip}:{'x'.join(map(str, dims))}",
                                             platform="tpu", **kwargs).devices)
  except (RuntimeError, ValueError) as e:
    raise UserError(f"--topology={name}: libtpu refused it ({str(e).splitlines()[0][:300]})") from None


def topology_mesh(name: str, mesh_sizes=(1, -1, 1)) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over the devices of topology `name`; one size may be -1 (the rest)."""
  return S.make_mesh(*mesh_sizes, devices=topology_devices(name))


def model_config_of(path: str) -> tuple[ModelConfig, str]:
  """(architecture, where it came from) of a model PATH without the network: a known hub id or
  preset name, else a local HF directory or .gguf file."""
  path = str(path or "embedded")
  if os.path.exists(path):
    return loading.load_config(path), path
  if path in HUB_PRESETS:
    return PRESETS[HUB_PRESETS[path]], f"preset {HUB_PRESETS[path]}"
  if path in PRESETS:
    return PRESETS[path], f"preset {path}"
  raise UserError(f"model.path={path!r}: not a local model and not a hub id known offline "
                  f"({', '.join(k for k in HUB_PRESETS if '/' in k)}); ahead-of-time compilation needs no weights, "
                  "only the architecture: pass a local HF directory with its config.json")


# ----------------------------------------------------------------------------------------------
# Compiling


def micro_batch_rows(c: ml_collections.ConfigDict) -> int:
  """Rows of one micro-batch: sequences, or chosen + rejected rows of the pairs for dpo."""
  return c.train.batch_size * (2 if c.stage == "dpo" else 1)


def abstract_batch(c: ml_collections.ConfigDict, mesh) -> tuple[dict, dict]:
  """(batch, shardings): int32 [grad_accum, rows, max_length] leaves, as the training loop feeds them."""
  shape = (c.train.grad_accum, micro_batch_rows(c), c.data.max_length)
  shardings = {k: S.batch_sharding(mesh, 3, leading=1) for k in BATCH_KEYS}
  if c.stage == "dpo" and c.dpo.reference == "precomputed":
    shardings["ref_logps"] = S.batch_sharding(mesh, 2, leading=1)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s) for k, s in shardings.items()}
  if "ref_logps" in batch:
    batch["ref_logps"] = jax.ShapeDtypeStruct(shape[:2], jnp.float32, sharding=shardings["ref_logps"])
  return batch, shardings


def lower_step(c: ml_collections.ConfigDict, model_config: ModelConfig, mesh):
  """(abstract stage, lowered step): `train.compile_step` lowered on abstract inputs, under the mesh and
  the logical-axis rules as training runs it."""
  stage = train.abstract_stage(c, model_config, mesh)
  tx, _ = train.make_optimizer(c, total_steps=1000)
  batch, shardings = abstract_batch(c, mesh)
  step = train.compile_step(stage, tx, shardings)
  key = jax.eval_shape(jax.random.key, 0)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  return stage, step.lower(stage.state, stage.frozen, batch, rng)


def _lower_update(stage: train.Stage, tx):
  """The step's update alone (global norm, optax update, apply) on the trainable tree, lowered."""

  def update(state, grads):
    norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, norm

  replicated = jax.sharding.NamedSharding(stage.mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(update, in_shardings=(stage.state_shardings, stage.state_shardings["params"]),
               out_shardings=(stage.state_shardings, replicated), donate_argnums=(0,))
  return fn.lower(stage.state, stage.state["params"])


# SPMD turns some all-gather + matmul pairs into collective matmuls: loops, whose bodies the
# cost analysis counts once. The counting programs are compiled without them (same FLOPs).
COUNTING_OPTIONS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 1 << 30,
                    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
                    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _compile(lowered, options=None):
  """(compiled, wall seconds); compiler options a libtpu does not know are dropped."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  except Exception as e:  # noqa: BLE001 - the compiler's own error type
    if not options or "No such compile option" not in str(e):
      raise
    compiled = lowered.compile()
  return compiled, time.perf_counter() - start


def _counts(compiled) -> dict:
  """The compiler's FLOPs and bytes, collective bytes, and the loops whose bodies were counted once."""
  hlo = compiled.as_text()
  return {**_cost(compiled), "collective_bytes": float(collective_bytes(hlo)),
          "while_loops": len(re.findall(r"\swhile\(", hlo))}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


_COLLECTIVE = re.compile(r"=\s+(\S.*?)\s+(?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-done)?\(")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "bf16": 16, "f16": 16, "s16": 16, "u16": 16, "f32": 32,
         "s32": 32, "u32": 32, "f64": 64, "s64": 64, "u64": 64}


def collective_bytes(hlo: str) -> int:
  """Bytes produced per device by the collectives (all-gather, all-reduce, reduce-scatter, ...) of an
  HLO module's text, each counted once (the result of a synchronous op or of an async op's -done)."""
  total = 0
  for result in _COLLECTIVE.findall(hlo):
    for dtype, shape in _HLO_ARRAY.findall(result):
      total += math.prod(int(x) for x in shape.split(",") if x) * _BITS.get(dtype, 32) // 8
  return total


def _shard_bytes(x) -> int:
  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  return Q.nbytes(jax.ShapeDtypeStruct(shape, x.dtype))


# ----------------------------------------------------------------------------------------------
# The analytic count


def analytic_flops(mc: ModelConfig, lora_rank: int, lora_targets, *, rows: int, length: int, grad_accum: int,
                   remat: str, reference_forward: bool, head_weight_grad: bool = False,
                   attention: str = "dot") -> dict:
  """FLOPs of one optimizer step (all chips): {"model": without recomputation, "executed": with it,
  "kernel": the executed FLOPs inside Pallas kernels, "formula"}.

  Matmuls only (2 per multiply-add); norms, softmax, RoPE, SiLU, the loss,
  dequantization and the optimizer are left out (a few percent at most for these models).
  "model" counts attention over the full T x T whatever the kernel, so that MFU
  compares kernels on the same work; "executed" counts what the kernel computes.
  """
  d, v, n_layers = mc.hidden_size, mc.vocab_size, mc.num_layers
  dims = LA.projection_dims(mc)
  frozen = sum(i * o for i, o in dims.values())  # per layer
  adapters = sum(lora_rank * (i + o) for name, (i, o) in dims.items() if name in lora_targets)
  tokens = rows * length
  attn = 4 * rows * length ** 2 * mc.num_heads * mc.head_dim  # QK^T and PV over the full T x T
  if attention == "splash":
    # Only the tiles on or below the diagonal are computed (of the padded length). The backward kernels
    # recompute Q K^T from the saved log-sum-exp: 7 tile products (dq: QK^T, dO V^T, dS K; dk and dv:
    # QK^T, P^T dO, dO V^T, dS^T Q) against autodiff's 4.
    computed, _ = splash.causal_blocks(length)
    attn_fwd = 4 * rows * computed * splash.block_size(length) ** 2 * mc.num_heads * mc.head_dim
    attn_bwd = 3.5 * attn_fwd
  else:
    attn_fwd, attn_bwd = attn, 2 * attn
  layer_fwd = 2 * tokens * (frozen + adapters) + attn
  head = 2 * tokens * d * v
  fwd = n_layers * layer_fwd + head
  # Layer 0's q/k/v products need no input gradient (the embedding is frozen): not counted.
  qkv = ("q_proj", "k_proj", "v_proj")
  unneeded = sum(2 * tokens * dims[p][0] * (dims[p][1] + (lora_rank if p in lora_targets else 0)) for p in qkv)
  bwd = (n_layers * (2 * tokens * frozen + 4 * tokens * adapters + 2 * attn) - unneeded
         + head * (2 if head_weight_grad else 1))
  ref = n_layers * (2 * tokens * frozen + attn) + head if reference_forward else 0
  # Full remat recomputes a layer's forward except down_proj's product: the backward pass needs
  # its input (and the adapter's x A), not its output. Under "dots" every product is saved; under
  # "dots_no_batch" the attention products (batched einsums) are not.
  f_in, f_out = dims["down_proj"]
  last = 2 * tokens * f_in * f_out + (2 * tokens * lora_rank * f_out if "down_proj" in lora_targets else 0)
  recompute = {"none": 0, "full": n_layers * (layer_fwd - last), "dots": 0, "dots_no_batch": n_layers * attn}[remat]
  kernel = 0
  if attention == "splash":
    # A Pallas call is not a dot: every remat policy recomputes its forward.
    recompute += {"none": 0, "full": n_layers * (attn_fwd - attn), "dots": n_layers * attn_fwd,
                  "dots_no_batch": n_layers * (attn_fwd - attn)}[remat]
    kernel = grad_accum * n_layers * (attn_fwd + attn_bwd + (attn_fwd if reference_forward else 0)
                                      + (attn_fwd if remat != "none" else 0))
  model = grad_accum * (fwd + bwd + ref)
  # What the kernel executes instead of the model's full T x T (forward, backward, DPO reference).
  swap = grad_accum * n_layers * ((attn_fwd - attn) * (2 if reference_forward else 1) + attn_bwd - 2 * attn)
  formula = (
      f"per micro-batch of n = rows x T = {rows} x {length} tokens, per layer (L = {n_layers}): forward "
      f"2 n P + 2 n P_lora + A, backward 2 n P (input gradients only, frozen weights get none) + 4 n P_lora "
      f"(input and weight gradients) + 2 A, less layer 0's q/k/v input gradients (nothing upstream needs them; "
      f"the layer scan computes them anyway); lm_head 2 n D V forward + 2 n D V backward"
      f"{' + 2 n D V weight gradient' if head_weight_grad else ''}"
      f"{'; DPO reference forward (adapters off) L (2 n P + A) + 2 n D V' if reference_forward else ''}; "
      f"times {grad_accum} micro-batches. P = {frozen} frozen projection weights per layer, P_lora = {adapters} "
      f"adapter weights per layer, A = 4 rows T^2 N H = {attn} attention FLOPs per layer (QK^T and PV over the "
      f"full T x T), D = {d}, V = {v}. "
      + ("With attention=dot the causal mask is applied, not skipped: A forward, 2 A backward are computed. "
         if attention != "splash" else
         f"With attention=splash the kernel computes only the {splash.causal_blocks(length)[0]} of "
         f"{splash.causal_blocks(length)[1]} tiles ({splash.block_size(length)} x {splash.block_size(length)}) "
         f"on or below the diagonal: A_s = {attn_fwd:.6g} forward, 3.5 A_s backward (7 tile products, "
         f"Q K^T recomputed), so 'executed' counts A_s and 3.5 A_s where 'model' counts A and 2 A; the "
         f"compiler counts no FLOPs inside a Pallas call, so the kernel's {kernel:.6g} FLOPs of the step "
         "are added to its count. ")
      + f"'executed' adds the remat={remat} recomputation of the forward ({recompute} per micro-batch; full: "
      "all but down_proj's product, whose output the backward does not need). Matmuls only.")
  return {"model": float(model), "executed": float(model + swap + grad_accum * recompute), "kernel": float(kernel),
          "formula": formula,
          "attention_share": float(grad_accum * n_layers * attn * (3 + (1 if reference_forward else 0)) / model)}


# ----------------------------------------------------------------------------------------------
# Is the frozen base still 4-bit in the TPU program?

_HLO_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")


def _entry_parameters(hlo: str) -> collections.Counter:
  """(dtype, shape) of every parameter of the ENTRY computation of an HLO module's text."""
  line = next((ln for ln in hlo.splitlines() if ln.startswith("ENTRY")), "")
  params = line.split("->")[0]
  return collections.Counter((t, tuple(int(x) for x in s.split(",") if x)) for t, s in _HLO_ARRAY.findall(params))


def frozen_weights_check(stage: train.Stage, hlo: str) -> dict:
  """Per-device bytes of the frozen tree, and evidence from the compiled TPU program that the
  quantized projections arrive as their 4-bit codes (u8, two weights per byte) and that no
  dense float copy of a stacked projection [L, I, O] exists anywhere in the program."""
  params = _entry_parameters(hlo)
  total = quantized_bytes = weights = 0
  expected = matched = dense_params = stacked_dense = 0
  for node in jax.tree.leaves(stage.frozen, is_leaf=lambda x: isinstance(x, (Q.NF4Weight, Q.Int4Weight))):
    leaves = jax.tree.leaves(node)
    node_bytes = sum(_shard_bytes(x) for x in leaves)
    total += node_bytes
    if not isinstance(node, Q.NF4Weight):
      continue
    quantized_bytes += node_bytes
    codes = node.codes
    shard = tuple(codes.sharding.shard_shape(codes.shape))
    dense = shard[:-2] + (2 * shard[-2], shard[-1])  # [..., I, O] of this device's share
    weights += math.prod(dense)
    expected += 1
    matched += params[("u8", shard)] > 0 and codes.dtype == jnp.uint8
    dense_params += sum(params[(t, dense)] for t in ("bf16", "f32", "f16"))
    if len(dense) == 3:  # a scanned stack: one layer's dense weight in the loop is expected, all of them not
      (n_layers, i_shard, o_shard), (i_full, o_full) = dense, node.shape
      stacked_dense += any(f"{t}[{n_layers},{i},{o}]" in hlo for t in ("bf16", "f32", "f16")
                           for i in {i_shard, i_full} for o in {o_shard, o_full})
  return {
      "frozen_bytes_per_device": int(total),
      "nf4_bytes_per_device": int(quantized_bytes),
      "nf4_bits_per_weight": 8 * quantized_bytes / weights if weights else None,
      "nf4_weights": expected,
      "nf4_codes_u8_parameters": int(matched),
      "dense_float_weight_parameters": int(dense_params),
      "stacked_dense_weights_in_program": int(stacked_dense),
      "ok": bool(expected == 0 or (matched == expected and dense_params == 0 and stacked_dense == 0)),
      "method": ("per-device bytes from each frozen leaf's shard shape; each NF4 weight's codes must be an ENTRY "
                 "parameter of the compiled TPU HLO as u8 [..., I/2, O] (per-device shard), no ENTRY parameter may "
                 "have a dense weight's shard shape [..., I, O] in bf16/f16/f32, and no array of the program may "
                 "be a dense stacked [L, I, O] copy (per-device or gathered dims)"),
  }


# ----------------------------------------------------------------------------------------------
# The report


def _replace(c: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(c.to_dict())
  for key, value in fields.items():
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return out


def _progress(message: str) -> None:
  print(f"aot: {message}", file=sys.stderr, flush=True)


def _oom(error: Exception) -> str | None:
  """The compiler's out-of-memory message (HBM, or on-chip VMEM for an oversized op), else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  return " ".join(line.strip() for line in text.splitlines()[:2])[:500]


def compile_report(c: ml_collections.ConfigDict, topology: str, *, cross_check: bool = True) -> dict:
  """Compiles the stage's train step for `topology` and reports memory, FLOPs and an estimated speed.

  The keys are listed in INTERFACE.md (scripts/aot_compile.py); per-device
  values are for one chip, `model_flops` for the whole step on all chips.
  """
  stage_config.validate(c)
  chip_name, _ = parse_topology(topology)
  chip = CHIPS[chip_name]
  model_config, source = model_config_of(c.model.path)
  mesh = topology_mesh(topology, (c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
  devices = mesh.size
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if c.train.batch_size % shards:
    raise UserError(f"config field 'train.batch_size'={c.train.batch_size}: not divisible by mesh.data x mesh.fsdp "
                    f"= {shards}, the devices the batch is split over")
  rows, length, accum = micro_batch_rows(c), c.data.max_length, c.train.grad_accum
  groups = tuple(g.strip() for g in c.train.trainable.split(",") if g.strip())
  head_grad = ("lm_head" in groups and not model_config.tie_word_embeddings) or (
      "embed_tokens" in groups and model_config.tie_word_embeddings)
  counted = analytic_flops(model_config, c.lora.rank, tuple(c.lora.targets.split(",")), rows=rows, length=length,
                           grad_accum=accum, remat=c.model.remat, head_weight_grad=head_grad,
                           reference_forward=c.stage == "dpo" and c.dpo.reference == "base",
                           attention=c.model.attention)
  report = {
      "topology": topology, "chip": chip_name, "devices": devices, "mesh": dict(mesh.shape), "stage": c.stage,
      "model": {"path": c.model.path, "architecture": source, "num_layers": model_config.num_layers,
                "num_params": model_config.num_params, "dtype": c.model.dtype, "remat": c.model.remat,
                "attention": c.model.attention,
                "quant": c.quant.type, "lora_rank": c.lora.rank},
      "batch": {"batch_size": c.train.batch_size, "rows_per_micro_batch": rows, "grad_accum": accum,
                "max_length": length, "rows_per_device": rows // shards,
                "tokens_per_step": accum * rows * length},
      "hbm_bytes_per_device": chip.hbm_bytes, "peak_flops_per_chip": chip.peak_flops,
      "hbm_bandwidth_per_chip": chip.hbm_bandwidth,
      "model_flops": counted["model"], "flops_analytic": counted["executed"] / devices,
      "attention_share_of_model_flops": counted["attention_share"], "flop_formula": counted["formula"],
  }
  stage, lowered = lower_step(c, model_config, mesh)
  jobs = [lowered]
  if cross_check:
    small = _replace(c, **{"model.scan_layers": False, "train.grad_accum": 1})
    jobs += [lower_step(small, dataclasses.replace(model_config, num_layers=n), mesh)[1] for n in (1, 2)]
    jobs.append(_lower_update(stage, train.make_optimizer(c, total_steps=1000)[0]))
  _progress(f"compiling the {c.stage} step for {topology} ({devices} devices, mesh {dict(mesh.shape)})"
            + (", and 1- and 2-layer unrolled steps and the update alone to count FLOPs and bytes" if cross_check
               else ""))
  start, cpu = time.perf_counter(), time.process_time()
  # The compiler works on one core per program; the programs are independent.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
    futures = [pool.submit(_compile, x, COUNTING_OPTIONS if i else None) for i, x in enumerate(jobs)]
    try:
      compiled, seconds = futures[0].result()
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory verdict is a result, not a failure
      for f in futures[1:]:
        f.cancel()
      if not _oom(e):
        raise
      return {**report, "fits": False, "compile_error": _oom(e), "per_device_bytes": None, "flops": None,
              "bytes_accessed": None, "estimated_step_seconds": None, "estimated_mfu": None,
              "tokens_per_second_per_chip": None, "compile_seconds": None}
    counts = [_counts(f.result()[0]) for f in futures[1:]]
  mem = compiled.memory_analysis()
  per_device = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
                "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes,
                "generated_code": mem.generated_code_size_in_bytes}
  per_device["total"] = per_device["argument"] + per_device["output"] + per_device["temp"] - per_device["alias"]
  raw = _cost(compiled)
  check = frozen_weights_check(stage, compiled.as_text())
  report.update({"per_device_bytes": per_device, "fits": per_device["total"] <= chip.hbm_bytes,
                 "compile_seconds": round(seconds, 1), "all_compiles_seconds": round(time.perf_counter() - start, 1),
                 "all_compiles_cpu_seconds": round(time.process_time() - cpu, 1), "flops_xla_raw": raw["flops"],
                 "bytes_accessed_xla_raw": raw["bytes"], "frozen_check": check,
                 "frozen_bytes_per_device": check["frozen_bytes_per_device"]})

  flops, accessed = counted["executed"] / devices, None
  if cross_check:
    one, two, update = counts
    keys = ("flops", "bytes", "collective_bytes")
    whole = {k: one[k] + (two[k] - one[k]) * (model_config.num_layers - 1) for k in keys}
    flops, accessed, collective = (accum * whole[k] - (accum - 1) * update[k] for k in keys)
    flops += counted["kernel"] / devices  # Pallas calls are opaque to the compiler's count
    report.update({"flops_ratio": flops * devices / counted["executed"], "collective_bytes_per_device": collective,
                   "cross_check": {"cost_1_layer": one, "cost_2_layers": two, "cost_update": update,
                                   "method": "per device: accum x (a + b L) - (accum - 1) x update, where "
                                             "a + b L is fitted to the compiler's counts for unrolled 1- and "
                                             "2-layer steps of one micro-batch (each includes one update), "
                                             "compiled without collective matmuls; loops left in them "
                                             "(while_loops) would be counted once"}})
  report["flops"] = flops
  report["bytes_accessed"] = accessed
  compute_s = flops / chip.peak_flops
  memory_s = accessed / chip.hbm_bandwidth if accessed is not None else 0.0
  step_s = max(compute_s, memory_s)
  report.update({
      "estimated_step_seconds": step_s, "estimated_compute_seconds": compute_s, "estimated_memory_seconds":
      memory_s if accessed is not None else None, "estimated_bound": "compute" if compute_s >= memory_s else "memory",
      "estimated_mfu": counted["model"] / (step_s * chip.peak_flops * devices),
      "tokens_per_second_per_chip": accum * rows * length / step_s / devices,
      "estimate": "roofline max(flops / peak, bytes / HBM bandwidth) per chip; collectives "
                  "(collective_bytes_per_device) and their overlap are not in it; tokens count every position "
                  "of the [rows, T] batch, padding included",
  })
  return report


def fit_micro_batch(c: ml_collections.ConfigDict, topology: str) -> tuple[ml_collections.ConfigDict, dict, list[dict]]:
  """(config, report, trials): the largest micro-batch, at most the config's, that fits `topology`, its
  `compile_report` without cross-check, and what each tried size needed.

  The optimizer step keeps its size: `batch_size x grad_accum` stays the
  config's, so only the split between the micro-batch and the accumulation
  steps changes. Sizes are tried from the config's down, each a divisor of the
  step's batch and a multiple of the devices the batch is split over; each
  trial is one compile of the step (no cross-check programs).
  """
  mesh = topology_mesh(topology, (c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  total = c.train.batch_size * c.train.grad_accum
  trials = []
  for size in range(c.train.batch_size, 0, -1):
    if total % size or size % shards:
      continue
    trial = _replace(c, **{"train.batch_size": size, "train.grad_accum": total // size})
    report = compile_report(trial, topology, cross_check=False)
    trials.append({"batch_size": size, "grad_accum": total // size, "fits": report["fits"],
                   "total_bytes": (report["per_device_bytes"] or {}).get("total"),
                   "compile_error": report.get("compile_error")})
    _progress(f"micro-batch {size} x {total // size}: " + ("fits" if report["fits"] else "does not fit"))
    if report["fits"]:
      return trial, report, trials
  raise UserError(f"--topology={topology}: no micro-batch of the step's {total} "
                  f"{'pairs' if c.stage == 'dpo' else 'rows'} fits, down to {shards} per micro-batch "
                  f"({shards} device(s) share it); use a larger topology or a shorter data.max_length")


def write_json(path: str, value) -> None:
  """Writes `value` as JSON atomically (a temporary file, then a rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
