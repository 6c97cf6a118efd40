"""Ahead-of-time compilation of a stage's training step for a Cloud TPU topology, on a CPU host.

libtpu provides compile-only TPU devices for a named topology ('v5e:2x4'); the
real jitted train step (`step.compile_step`) is lowered against abstract
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
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from anita_jax import files
from anita_jax.errors import UserError
from anita_jax.model import quant as Q
from anita_jax.model.config import ModelConfig
from anita_jax.train import config as C
from anita_jax.train import state as ST
from anita_jax.train import objectives as OBJ
from anita_jax.train import step as STEP
from anita_jax.train.flops import analytic_flops
from anita_jax.train.optim import make_optimizer
from anita_jax.train.topology import CHIPS, model_config_of, parse_topology, topology_mesh



# ----------------------------------------------------------------------------------------------
# Compiling


def abstract_batch(c: C.StageConfig, mesh) -> tuple[dict, dict]:
  """(batch, shardings): int32 [grad_accum, rows, tokens] leaves (and the objective's extra inputs),
  as the training loop feeds them."""
  shape = (c.train.grad_accum, *ST.micro_batch_shape(c))
  shardings = STEP.batch_shardings(c, mesh)
  kinds = {**{k: (3, jnp.int32) for k in STEP.BATCH_KEYS}, **OBJ.objective(c.stage).extra_inputs(c)}
  batch = {k: jax.ShapeDtypeStruct(shape[:rank], dtype, sharding=shardings[k]) for k, (rank, dtype) in kinds.items()}
  return batch, shardings


def lower_step(c: C.StageConfig, model_config: ModelConfig, mesh, frozen_rank: int = 0):
  """(abstract stage, lowered step): `step.compile_step` lowered on abstract inputs, under the mesh and
  the logical-axis rules as training runs it. frozen_rank: of a stacked stage's earlier adapters."""
  stage = ST.abstract_stage(c, model_config, mesh, frozen_rank=frozen_rank)
  tx, _ = make_optimizer(c.train, total_steps=1000)
  batch, shardings = abstract_batch(c, mesh)
  step = STEP.compile_step(stage, tx, shardings)
  key = jax.eval_shape(jax.random.key, 0)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  return stage, step.lower(stage.state, stage.frozen, batch, rng)


def _lower_update(stage: ST.Stage, tx):
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
# Is the frozen base still 4-bit in the TPU program?

_HLO_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")


def _entry_parameters(hlo: str) -> collections.Counter:
  """(dtype, shape) of every parameter of the ENTRY computation of an HLO module's text."""
  line = next((ln for ln in hlo.splitlines() if ln.startswith("ENTRY")), "")
  params = line.split("->")[0]
  return collections.Counter((t, tuple(int(x) for x in s.split(",") if x)) for t, s in _HLO_ARRAY.findall(params))


def frozen_weights_check(stage: ST.Stage, hlo: str) -> dict:
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


def _progress(message: str) -> None:
  print(f"aot: {message}", file=sys.stderr, flush=True)


def _oom(error: Exception) -> str | None:
  """The compiler's out-of-memory message (HBM, or on-chip VMEM for an oversized op), else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  return " ".join(line.strip() for line in text.splitlines()[:2])[:500]


def compile_report(c, topology: str, *, cross_check: bool = True, frozen_rank: int = 0) -> dict:
  """Compiles the stage's train step for `topology` and reports memory, FLOPs and an estimated speed.

  frozen_rank: for a stacked stage (init_as=stacked), the summed rank of the earlier stages' adapters it
  keeps frozen (the 8B recipe: dpo 16, lm 16 + 64 = 80); they are in the memory and the compiled step,
  not in the analytic FLOPs.

  The keys are those of `_describe` and the functions below it (scripts/aot_compile.py prints them as
  JSON); per-device values are for one chip, `model_flops` for the whole step on all chips.
  """
  c = C.freeze(c)
  C.validate(c)
  model_config, source = model_config_of(c.model.path)
  mesh = topology_mesh(topology, (c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
  C.check_batch_split(c, mesh.shape["data"] * mesh.shape["fsdp"])
  counted = _analytic(c, model_config)
  report = _describe(c, topology, mesh, model_config, source, frozen_rank, counted)
  stage, lowered = lower_step(c, model_config, mesh, frozen_rank)
  jobs = [lowered]
  if cross_check:
    small = C.replace(c, **{"model.scan_layers": False, "train.grad_accum": 1})
    jobs += [lower_step(small, dataclasses.replace(model_config, num_layers=n), mesh, frozen_rank)[1]
             for n in (1, 2)]
    jobs.append(_lower_update(stage, make_optimizer(c.train, total_steps=1000)[0]))
  _progress(f"compiling the {c.stage} step for {topology} ({mesh.size} devices, mesh {dict(mesh.shape)})"
            + (", and 1- and 2-layer unrolled steps and the update alone to count FLOPs and bytes" if cross_check
               else ""))
  try:
    compiled, counts, timing = _compile_all(jobs)
  except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory verdict is a result, not a failure
    if not _oom(e):
      raise
    return {**report, "fits": False, "compile_error": _oom(e), "per_device_bytes": None, "flops": None,
            "bytes_accessed": None, "estimated_step_seconds": None, "estimated_mfu": None,
            "tokens_per_second_per_chip": None, "compile_seconds": None}
  report.update(timing)
  report.update(_memory(compiled, stage, CHIPS[report["chip"]]))
  flops, accessed = counted["executed"] / mesh.size, None
  if cross_check:
    flops, accessed, extra = _cross_checked(counts, model_config.num_layers, c.train.grad_accum, counted, mesh.size)
    report.update(extra)
  report.update(_estimate(report, flops, accessed, counted, CHIPS[report["chip"]]))
  return report


def _analytic(c, model_config) -> dict:
  """`flops.analytic_flops` of the stage's step."""
  (rows, length), groups = ST.micro_batch_shape(c), C.trainable_groups(c)
  head_grad = ("lm_head" in groups and not model_config.tie_word_embeddings) or (
      "embed_tokens" in groups and model_config.tie_word_embeddings)
  return analytic_flops(model_config, c.lora.rank, tuple(files.split_list(c.lora.targets)), rows=rows, length=length,
                        grad_accum=c.train.grad_accum, remat=c.model.remat, head_weight_grad=head_grad,
                        reference_forward=OBJ.objective(c.stage).reference_forward(c), attention=c.model.attention)


def _describe(c, topology, mesh, model_config, source, frozen_rank, counted) -> dict:
  """What is compiled: topology, model, batch, the chip's figures and the analytic FLOPs."""
  chip_name, _ = parse_topology(topology)
  chip = CHIPS[chip_name]
  (rows, length), accum = ST.micro_batch_shape(c), c.train.grad_accum
  return {
      "topology": topology, "chip": chip_name, "devices": mesh.size, "mesh": dict(mesh.shape), "stage": c.stage,
      "model": {"path": c.model.path, "architecture": source, "num_layers": model_config.num_layers,
                "num_params": model_config.num_params, "dtype": c.model.dtype, "remat": c.model.remat,
                "attention": c.model.attention,
                "quant": c.quant.type, "lora_rank": c.lora.rank, "frozen_lora_rank": frozen_rank},
      "batch": {"batch_size": c.train.batch_size, "rows_per_micro_batch": rows, "grad_accum": accum,
                "max_length": length, "rows_per_device": rows // (mesh.shape["data"] * mesh.shape["fsdp"]),
                "tokens_per_step": accum * rows * length},
      "hbm_bytes_per_device": chip.hbm_bytes, "peak_flops_per_chip": chip.peak_flops,
      "hbm_bandwidth_per_chip": chip.hbm_bandwidth,
      "model_flops": counted["model"], "flops_analytic": counted["executed"] / mesh.size,
      "attention_share_of_model_flops": counted["attention_share"], "flop_formula": counted["formula"],
  }


def _compile_all(jobs) -> tuple[Any, list[dict], dict]:
  """(the step's compiled program, the cost counts of the other jobs, timings). The compiler works on one
  core per program and the programs are independent: they compile in parallel."""
  start, cpu = time.perf_counter(), time.process_time()
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
    futures = [pool.submit(_compile, x, COUNTING_OPTIONS if i else None) for i, x in enumerate(jobs)]
    try:
      compiled, seconds = futures[0].result()
    except Exception:
      for f in futures[1:]:
        f.cancel()
      raise
    counts = [_counts(f.result()[0]) for f in futures[1:]]
  return compiled, counts, {"compile_seconds": round(seconds, 1),
                            "all_compiles_seconds": round(time.perf_counter() - start, 1),
                            "all_compiles_cpu_seconds": round(time.process_time() - cpu, 1)}


def _memory(compiled, stage, chip) -> dict:
  """Per-device memory of the compiled step, whether it fits, the compiler's raw cost and the 4-bit check."""
  mem = compiled.memory_analysis()
  per_device = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
                "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes,
                "generated_code": mem.generated_code_size_in_bytes}
  per_device["total"] = per_device["argument"] + per_device["output"] + per_device["temp"] - per_device["alias"]
  raw = _cost(compiled)
  check = frozen_weights_check(stage, compiled.as_text())
  return {"per_device_bytes": per_device, "fits": per_device["total"] <= chip.hbm_bytes,
          "flops_xla_raw": raw["flops"], "bytes_accessed_xla_raw": raw["bytes"], "frozen_check": check,
          "frozen_bytes_per_device": check["frozen_bytes_per_device"]}


def _cross_checked(counts, num_layers: int, accum: int, counted: dict, devices: int):
  """(flops, bytes accessed, report entries) per device of the whole step, from the compiler's counts of
  unrolled 1- and 2-layer steps and of the update alone."""
  one, two, update = counts
  keys = ("flops", "bytes", "collective_bytes")
  whole = {k: one[k] + (two[k] - one[k]) * (num_layers - 1) for k in keys}
  flops, accessed, collective = (accum * whole[k] - (accum - 1) * update[k] for k in keys)
  flops += counted["kernel"] / devices  # Pallas calls are opaque to the compiler's count
  return flops, accessed, {
      "flops_ratio": flops * devices / counted["executed"], "collective_bytes_per_device": collective,
      "cross_check": {"cost_1_layer": one, "cost_2_layers": two, "cost_update": update,
                      "method": "per device: accum x (a + b L) - (accum - 1) x update, where a + b L is fitted to "
                                "the compiler's counts for unrolled 1- and 2-layer steps of one micro-batch (each "
                                "includes one update), compiled without collective matmuls; loops left in them "
                                "(while_loops) would be counted once"}}


def _estimate(report: dict, flops: float, accessed: float | None, counted: dict, chip) -> dict:
  """The roofline step time per chip and what follows from it (MFU, tokens per second)."""
  compute_s = flops / chip.peak_flops
  memory_s = accessed / chip.hbm_bandwidth if accessed is not None else 0.0
  step_s = max(compute_s, memory_s)
  return {
      "flops": flops, "bytes_accessed": accessed,
      "estimated_step_seconds": step_s, "estimated_compute_seconds": compute_s, "estimated_memory_seconds":
      memory_s if accessed is not None else None, "estimated_bound": "compute" if compute_s >= memory_s else "memory",
      "estimated_mfu": counted["model"] / (step_s * chip.peak_flops * report["devices"]),
      "tokens_per_second_per_chip": report["batch"]["tokens_per_step"] / step_s / report["devices"],
      "estimate": "roofline max(flops / peak, bytes / HBM bandwidth) per chip; collectives "
                  "(collective_bytes_per_device) and their overlap are not in it; tokens count every position "
                  "of the [rows, T] batch, padding included",
  }


def fit_micro_batch(c, topology: str, frozen_rank: int = 0) -> tuple[C.StageConfig, dict, list[dict]]:
  """(config, report, trials): the largest micro-batch, at most the config's, that fits `topology`, its
  `compile_report` without cross-check, and what each tried size needed.

  The optimizer step keeps its size: `batch_size x grad_accum` stays the
  config's, so only the split between the micro-batch and the accumulation
  steps changes. Sizes are tried from the config's down, each a divisor of the
  step's batch and a multiple of the devices the batch is split over; each
  trial is one compile of the step (no cross-check programs).
  """
  c = C.freeze(c)
  mesh = topology_mesh(topology, (c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  total = c.train.batch_size * c.train.grad_accum
  trials = []
  for size in range(c.train.batch_size, 0, -1):
    if total % size or size % shards:
      continue
    trial = C.replace(c, **{"train.batch_size": size, "train.grad_accum": total // size})
    report = compile_report(trial, topology, cross_check=False, frozen_rank=frozen_rank)
    trials.append({"batch_size": size, "grad_accum": total // size, "fits": report["fits"],
                   "total_bytes": (report["per_device_bytes"] or {}).get("total"),
                   "compile_error": report.get("compile_error")})
    _progress(f"micro-batch {size} x {total // size}: " + ("fits" if report["fits"] else "does not fit"))
    if report["fits"]:
      return trial, report, trials
  raise UserError(f"--topology={topology}: no micro-batch of the step's {total} "
                  f"{OBJ.objective(c.stage).example_name} fits, down to {shards} per micro-batch "
                  f"({shards} device(s) share it); use a larger topology or a shorter data.max_length")
