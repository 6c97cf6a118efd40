"""Training step speed and memory of the ANITA 8B recipe on whatever accelerator JAX sees (GPU, TPU, CPU).

python scripts/bench_gpu.py [--stages=sft,dpo] [--config=configs/anita_8b.py] [--preset=llama3-8b]
    [--config.sft.train.batch_size=2] [--steps=5] [--output=FILE.jsonl]
CPU smoke run: --preset=tiny --config.sft.data.max_length=64 --config.dpo.data.max_length=64 --steps=2
    --peak_size=1024

Each stage is the recipe's (configs/anita_8b.py): Llama-3-8B architecture (`PRESETS[--preset]`), NF4 with double
quantization, bf16 compute, full remat, LoRA rank/alpha/targets, sequence length, micro-batch and layout of that
stage (dpo: the reference is the base with the adapters off; with the recipe's data.packing, rows of packed pairs
built by the training packer, each pair a prompt of T/4 and two completions of 3T/4 tokens, one pair a row;
without, [chosen rows; rejected rows] of those pairs), attention `--attention` (dot: splash is TPU-only), one
micro-batch per step unless --grad_accum. If the micro-batch does not fit, it is halved
(`fit_trials` lists the sizes tried). The frozen weights are random (bf16 normal * 0.02, the projections
quantized on device; no host copy): step time and memory do not depend on weight values.
Each stage runs in its own process, so `peak_bytes` (the device allocator's peak) is that stage's alone.
Model FLOPs per step, as scripts/bench_train.py: `train.flops.benchmark_flops` (remat's recomputation is not
counted). MFU = model FLOPs / step time / peak,
peak = a bf16 --peak_size^3 matmul measured on the same device.
"""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # before JAX starts: room for the largest batch

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from anita_jax.apps import cli  # noqa: E402

_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "anita_8b.py")
_CONFIG = config_flags.DEFINE_config_file("config", _RECIPE, "A whole recipe (one ConfigDict per stage).",
                                          lock_config=True)
_STAGES = flags.DEFINE_list("stages", ["sft", "dpo"], "Stages to time, each in its own process.")
_PRESET = flags.DEFINE_string("preset", "llama3-8b", "Architecture: a name in anita_jax.model.config.PRESETS.")
_ATTENTION = flags.DEFINE_string("attention", "dot", "Attention kind for every stage.")
_GRAD_ACCUM = flags.DEFINE_integer("grad_accum", 1, "Micro-batches per timed step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps, after one warm-up step.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 8192, "Side of the bf16 matmul that measures the peak FLOP/s.")
_FIT = flags.DEFINE_bool("fit", True, "Halve the micro-batch until the step fits in device memory.")
_OUTPUT = flags.DEFINE_string("output", None, "Append the JSON lines to this file.")
_OOM = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def peak_flops(n: int) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  f(a).block_until_ready()
  reps = max(3, min(200, int(1.0 / (time.perf_counter() - start))))  # about a second
  start = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return reps * 2 * n ** 3 / (time.perf_counter() - start)


def model_flops(model_config, c, rows: int, length: int) -> float:
  from anita_jax import files
  from anita_jax.train import objectives
  from anita_jax.train.flops import benchmark_flops
  reference_forward = objectives.objective(c.stage).reference_forward(c)
  return c.train.grad_accum * benchmark_flops(model_config, c.lora.rank, files.split_list(c.lora.targets), rows=rows,
                                              length=length, reference_forward=reference_forward)


def _random_frozen(stage, quant):
  """The frozen tree on device in its shardings: bf16 normal * 0.02, projections quantized per layer."""
  import math

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from anita_jax.model import quant as Q
  from anita_jax.model import tree as PT
  normal = lambda key, shape, dtype: (0.02 * jax.random.normal(key, shape, jnp.bfloat16)).astype(dtype)

  def leaf(key, like):
    if not isinstance(like, (Q.NF4Weight, Q.Int4Weight)):
      return normal(key, like.shape, like.dtype)
    init = Q.init_fn(quant, (None, None), normal)
    lead = jax.tree.leaves(like)[0].shape[:-2]
    # One [I, O] matrix at a time (lax.map, not vmap): only one layer's fp32 copy is ever live.
    nodes = jax.lax.map(lambda k: nn.meta.unbox(init(k, like.shape)), jax.random.split(key, math.prod(lead)))
    return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), nodes)

  def tree(key):
    flat = sorted(PT.flatten(stage.frozen).items())
    return PT.unflatten({path: leaf(k, like) for k, (path, like) in zip(jax.random.split(key, len(flat)), flat)})

  frozen = jax.jit(tree, out_shardings=stage.frozen_shardings)(jax.random.key(0))
  same = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert same(frozen) == same(stage.frozen), "the random frozen tree differs from the stage's"
  return frozen


def _fresh_state(stage, tx):
  """Step 0, the recipe's initial adapters (other trainable leaves zero) and the optimizer state."""
  import jax
  import jax.numpy as jnp

  from anita_jax.model import lora as LA
  from anita_jax.model import tree as PT
  c = stage.config

  def init(key):
    adapters = PT.flatten(LA.init_adapters(key, stage.model_config, stage.spec, c.model.scan_layers))
    return PT.unflatten({p: adapters[p] if p in adapters else jnp.zeros(x.shape, x.dtype)
                         for p, x in PT.flatten(stage.state["params"]).items()})

  params = jax.jit(init, out_shardings=stage.state_shardings["params"])(jax.random.key(c.train.seed))
  opt_state = jax.jit(tx.init, out_shardings=stage.state_shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), stage.state_shardings["step"])
  return {"step": step, "params": params, "opt_state": opt_state}


def _packed_pairs(c, rng):
  """[A, rows, 2T] packed DPO rows from the training packer: pairs of a T/4 prompt and two 3T/4 completions."""
  import numpy as np

  from anita_jax.data import preference as PR
  t, rows = c.data.max_length, c.train.batch_size
  ids = lambda n: rng.randint(3, 1000, n).astype(np.int32)  # noqa: E731
  pairs = [PR.PreferenceExample(ids(t // 4), ids(t - t // 4), ids(t - t // 4)) for _ in range(rows)]
  it = PR.PreferenceBatchIterator(pairs, batch_size=rows, max_length=t, packing=True)
  micro = [next(it) for _ in range(c.train.grad_accum)]
  return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def _batch(c, mesh):
  """[A, rows, T] random tokens on device; dpo: a prompt of T/4 and completions of 3T/4 (`_packed_pairs` with
  data.packing, else chosen rows then rejected rows, loss on the last 3/4)."""
  import jax
  import numpy as np

  from anita_jax.train.step import batch_shardings
  rng = np.random.RandomState(0)
  if c.stage == "dpo" and c.data.packing:
    batch = _packed_pairs(c, rng)
  else:
    rows, t = c.train.batch_size * (2 if c.stage == "dpo" else 1), c.data.max_length
    ids = rng.randint(3, 1000, (c.train.grad_accum, rows, t)).astype(np.int32)
    mask = np.ones_like(ids)
    if c.stage == "dpo":
      mask[..., :t // 4] = 0
    batch = {"input_ids": ids, "loss_mask": mask, "segment_ids": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), ids.shape).copy()}
  shardings = batch_shardings(c, mesh)
  return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}, shardings


def prepare(c, model_config, frozen):
  """(frozen, state, compiled step, batch, compile seconds) of stage config `c` (frozen made if None)."""
  import jax

  from anita_jax.model import quant as Q
  from anita_jax.model import sharding as S
  from anita_jax.train.state import abstract_stage
  from anita_jax.train.step import compile_step
  from anita_jax.train.optim import make_optimizer
  stage = abstract_stage(c, model_config, S.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
  if frozen is None:
    frozen = _random_frozen(stage, Q.QuantSpec(c.quant.type, c.quant.block_size, c.quant.double_quant))
  tx, _ = make_optimizer(c.train, 1000)
  state = _fresh_state(stage, tx)
  batch, data_shardings = _batch(c, stage.mesh)
  jax.block_until_ready((frozen, state, batch))
  start = time.perf_counter()
  step = compile_step(stage, tx, data_shardings).lower(state, frozen, batch, jax.random.key(1)).compile()
  return frozen, state, step, batch, time.perf_counter() - start


def step_memory(step):
  """(bytes the step allocates beyond its arguments, bytes free on the device), None where unknown."""
  import jax
  stats, analysis = jax.devices()[0].memory_stats(), step.memory_analysis()
  if not stats or analysis is None:
    return None, None
  need = analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
  return int(need), int(stats["bytes_limit"] - stats["bytes_in_use"])


def time_steps(step, state, frozen, batch, steps: int) -> float:
  """Seconds per step after one warm-up step."""
  import jax
  rng = jax.random.key(1)
  state, metrics = step(state, frozen, batch, rng)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, frozen, batch, rng)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps


def run_stage(c, peak: float) -> dict:
  import jax

  from anita_jax.model.config import PRESETS
  model_config = PRESETS[_PRESET.value]
  c.model.attention, c.train.grad_accum = _ATTENTION.value, _GRAD_ACCUM.value
  frozen, trials = None, []
  while True:
    trials.append({"micro_batch": c.train.batch_size})
    try:
      frozen, state, step, batch, compile_s = prepare(c, model_config, frozen)
      need, free = step_memory(step)
      trials[-1].update(step_bytes=need, free_bytes=free)
      if free is not None and need > free:
        raise MemoryError(f"RESOURCE_EXHAUSTED: the step needs {need} bytes, {free} are free")
      seconds = time_steps(step, state, frozen, batch, _STEPS.value)
      break
    except (MemoryError, jax.errors.JaxRuntimeError) as e:
      if not _FIT.value or c.train.batch_size == 1 or not any(s in str(e) for s in _OOM):
        raise
      print(f"{c.stage}: micro-batch {c.train.batch_size} does not fit ({str(e)[:300]}); halving it",
            file=sys.stderr, flush=True)
      trials[-1]["fits"] = False
      state = step = batch = None
      c.train.batch_size //= 2
  packed_pairs = c.stage == "dpo" and c.data.packing
  rows = c.train.batch_size * (2 if c.stage == "dpo" and not packed_pairs else 1)
  row_length = c.data.max_length * (2 if packed_pairs else 1)
  # Packed pairs: the positions the rows hold (a prompt once per pair), as a dense model computes them.
  flops = model_flops(model_config, c, rows, row_length)
  tokens = rows * row_length * c.train.grad_accum
  pairs = c.train.batch_size * c.train.grad_accum if c.stage == "dpo" else None
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {"stage": c.stage, "preset": _PRESET.value, "device": device.device_kind, "platform": device.platform,
          "jax": jax.__version__, "seq_len": c.data.max_length, "micro_batch": c.train.batch_size,
          "rows": rows, "row_length": row_length, "packing": c.data.packing,
          "pairs_per_s": None if pairs is None else round(pairs / seconds, 2), "grad_accum": c.train.grad_accum, "lora_rank": c.lora.rank, "lora_alpha": c.lora.alpha,
          "attention": c.model.attention, "remat": c.model.remat, "quant": c.quant.type,
          "double_quant": c.quant.double_quant, "dtype": c.model.dtype, "compile_s": round(compile_s, 1),
          "step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
          "model_tflops_per_step": float(f"{flops / 1e12:.4g}"), "peak_tflops": float(f"{peak / 1e12:.4g}"),
          "mfu": round(flops / seconds / peak, 4), "peak_bytes": stats.get("peak_bytes_in_use"),
          "bytes_limit": stats.get("bytes_limit"), "fit_trials": trials, "steps": _STEPS.value}


def main(argv):
  del argv
  if len(_STAGES.value) > 1:  # one process per stage: the allocator's peak is per process
    args = [a for a in sys.argv[1:] if not a.startswith("--stages")]
    failed = [s for s in _STAGES.value
              if subprocess.run([sys.executable, os.path.abspath(__file__), f"--stages={s}", *args]).returncode]
    sys.exit(f"error: stage(s) {', '.join(failed)} failed" if failed else 0)
  row = run_stage(_CONFIG.value[_STAGES.value[0]], peak_flops(_PEAK_SIZE.value))
  print(json.dumps(row), flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  cli.run(main)
