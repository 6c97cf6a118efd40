"""One training stage (sft, lm or dpo) on any mesh: `train_and_evaluate(config, workdir)`.

Flow: config -> data (tokenized, batched deterministically) -> mesh -> the
stage (`state.build_stage`: the frozen base streamed into its shardings,
quantized on the way; fresh adapters and optimizer state) or its latest
checkpoint -> one jitted step (`step.compile_step`: gradient accumulation
inside, state donated) -> checkpoints, metrics, eval. What is optimized comes
from the stage's `Objective` (`step.OBJECTIVES`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from anita_jax import files
from anita_jax.data import rows as D
from anita_jax.errors import Preempted, UserError
from anita_jax.model import sharding as S
from anita_jax.train import config as C
from anita_jax.train import state as ST
from anita_jax.train import step as STEP
from anita_jax.train import workdir as W
from anita_jax.train.checkpoint import Checkpoints
from anita_jax.train.metrics import MetricsWriter
from anita_jax.train.optim import make_optimizer


def build_data(c: C.StageConfig, tokenizer, *, source: str = "train", num_processes: int = 1,
               process_index: int = 0, batch_size: int | None = None):
  """(iterator, stats) of data.train (source="train") or data.eval (source="eval"), as the objective encodes it."""
  split = c.data.split if source == "train" else c.data.eval_split
  rows = D.load_rows(files.split_list(getattr(c.data, source)), split=split, config_name=c.data.config_name,
                     fmt=c.data.format, max_rows=c.data.max_rows)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  obj = STEP.objective(c.stage)
  examples, stats = obj.encode(c, rows, tokenizer)
  it = obj.iterator(examples, c, batch_size=batch_size or c.train.batch_size, seed=c.train.seed, pad_id=pad,
                    num_processes=num_processes, process_index=process_index)
  return it, stats


def _check_resume(c, workdir: str) -> None:
  """A workdir resumes only the run it was made for: same base model, LoRA shape, quantization."""
  path = os.path.join(workdir, "config.json")
  if not files.isfile(path) or not files.isdir(os.path.join(workdir, "checkpoints")):
    return
  old = json.loads(files.read_bytes(path))
  for field in ("stage", "init_from", "init_as", "merge_into", "model.path", "lora.rank", "lora.targets", "lora.rslora",
                "lora.alpha", "quant.type", "quant.block_size", "quant.double_quant", "model.scan_layers",
                "train.trainable"):
    a, b = old, C.to_dict(c)
    for key in field.split("."):
      a, b = (a or {}).get(key), (b or {}).get(key)
    if a != b:
      raise UserError(f"{path}: this workdir was trained with {field}={a!r}, not {b!r}; use a new --workdir "
                      "or the original setting")


def _stack(batches: list[dict]) -> dict:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def evaluate(stage: ST.Stage, params, eval_iter, eval_fn) -> dict:
  """The objective's eval metrics over one pass of the eval set (`eval_loss`: token-weighted for sft/lm,
  the pair mean for dpo)."""
  totals: dict = {}
  for local in eval_iter.eval_batches():
    batch = {k: S.place_local(v, S.batch_sharding(stage.mesh)) for k, v in local.items()}
    for k, v in eval_fn(params, stage.frozen, batch).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return STEP.objective(stage.config.stage).eval_metrics(totals)


class _Clock:
  """Wall time per phase of a stage run, printed as one line at its end (where the time of a big stage goes)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._mark = time.time()

  def lap(self, phase: str) -> None:
    now = time.time()
    self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._mark
    self._mark = now

  def line(self, stage: str) -> str:
    return f"{stage} wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())


class _Preemption:
  """SIGTERM (what Cloud TPU sends before preempting a VM) asks for a checkpoint at the next step boundary.

  One process: a Python signal handler sets a flag. Several processes: JAX's preemption sync point,
  which agrees on one step across all hosts (jax.distributed starts its preemption service).
  """

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(c, workdir: str, stop_after: int | None = None) -> dict:
  """Runs (or resumes) one stage in `workdir`; returns the last logged metrics.

  c: the stage's ConfigDict or StageConfig.
  stop_after: end (with a checkpoint) once this step is reached, as a preemption would.
  Raises Preempted after saving, when SIGTERM arrived during the run.
  """
  c = C.freeze(c)
  C.validate(c)
  _check_resume(c, workdir)
  clock = _Clock()
  processes, index = jax.process_count(), jax.process_index()
  stage = ST.build_stage(c, W.base_model_path(c), frozen_adapters=W.frozen_adapters(c))
  clock.lap("import")
  obj = STEP.objective(c.stage)
  shards = stage.mesh.shape["data"] * stage.mesh.shape["fsdp"]
  if c.train.batch_size % shards:
    raise UserError(f"config field 'train.batch_size'={c.train.batch_size}: not divisible by mesh.data x mesh.fsdp "
                    f"= {shards}, the devices the batch is split over")
  train_iter, stats = build_data(c, stage.tokenizer, num_processes=processes, process_index=index)
  print(f"train data: {stats}", file=sys.stderr, flush=True)
  eval_iter = None
  if c.data.eval:
    eval_iter, eval_stats = build_data(c, stage.tokenizer, source="eval", num_processes=processes,
                                       process_index=index, batch_size=min(c.train.batch_size, 8 * processes))
    print(f"eval data: {eval_stats}", file=sys.stderr, flush=True)
  clock.lap("data")
  per_epoch = train_iter.steps_for_epochs(c.train.epochs) // c.train.grad_accum
  total = c.train.steps or max(per_epoch, 1)

  files.makedirs(workdir)
  if index == 0:
    files.write_json(os.path.join(workdir, "config.json"), C.to_dict(c))
  checkpoints = Checkpoints(workdir, c.checkpoint.keep)
  tx, schedule = make_optimizer(c.train, total)
  state, data_state = ST.restore_latest(stage, checkpoints)
  if data_state is not None:
    train_iter.restore((data_state["epoch"], data_state["index"]))
  clock.lap("state")
  prepared = obj.prepare(stage, train_iter, workdir)
  clock.lap("prepare")  # DPO: the reference log-probs, when precomputed
  data_sharding = STEP.data_shardings(stage)
  step_fn = STEP.compile_step(stage, tx, data_sharding)
  eval_fn = STEP.compile_eval(stage)
  writer = MetricsWriter(workdir, total)
  rng = jax.random.key(c.train.seed + 1)
  last: dict = {}
  step = first = int(state["step"])
  if step == 0 and eval_iter is not None and c.train.eval_on_start:
    writer.write(0, evaluate(stage, state["params"], eval_iter, eval_fn))
    clock.lap("eval")
  # Non-finite steps since the last sync, counted on device: no host sync per step.
  skipped, first_bad = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
  skipped_total = 0
  preemption = _Preemption()
  started, tokens = time.time(), 0.0
  try:
    while step < total:
      local = _stack([obj.next_batch(train_iter, prepared) for _ in range(c.train.grad_accum)])
      batch = {k: S.place_local(v, data_sharding[k]) for k, v in local.items()}
      state, metrics = step_fn(state, stage.frozen, batch, rng)
      step += 1
      if step == first + 1:  # jit compiles on the first call
        jax.block_until_ready(metrics)
        clock.lap("compile + first step")
      bad = jnp.logical_not(metrics.pop("finite"))
      first_bad = jnp.where(bad & (skipped == 0), step, first_bad)
      skipped = skipped + bad.astype(jnp.int32)
      tokens += float(np.sum(local["segment_ids"] != 0)) * processes
      is_last = step == total
      preempted = preemption.reached(step)
      stopping = preempted or (stop_after is not None and step >= stop_after)
      saving = step % c.checkpoint.every == 0 or is_last or stopping
      logging_ = step % c.train.log_every == 0 or is_last or step == 1
      if saving or logging_:  # the host syncs here anyway
        n, where = int(skipped), int(first_bad)
        skipped, first_bad = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
        if n and c.train.on_nonfinite == "stop":
          raise UserError(f"step {where}: the loss or gradient is not finite; training stopped and the last good "
                          "checkpoint is kept; lower train.lr or set train.on_nonfinite=skip")
        if n:
          skipped_total += n
          print(f"step {step}: skipped {n} step(s) with a non-finite loss or gradient (first: step {where}; "
                f"{skipped_total} in this run)", file=sys.stderr, flush=True)
      if logging_:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics.pop("tokens", None)
        elapsed = time.time() - started
        last = {**metrics, "learning_rate": float(schedule(step - 1)), "tokens_per_second": tokens / elapsed}
        if skipped_total:
          last["skipped_steps"] = float(skipped_total)
        started, tokens = time.time(), 0.0
        clock.lap("steps")
        if eval_iter is not None and (is_last or (c.train.eval_every and step % c.train.eval_every == 0)):
          last.update(evaluate(stage, state["params"], eval_iter, eval_fn))
          clock.lap("eval")
        writer.write(step, last)
        writer.progress(step, last)
      if saving:
        epoch, batch_index = train_iter.state()
        jax.block_until_ready(state)
        clock.lap("steps")
        checkpoints.save(step, state, {"epoch": epoch, "index": batch_index}, force=True)
        clock.lap("checkpoints")
      if preempted:
        raise Preempted(f"{workdir}: SIGTERM received; saved the checkpoint of step {step}; re-run the same "
                        "command to resume")
      if stopping:
        break
  finally:
    clock.lap("steps")  # nothing since the last lap, unless the loop ended early
    preemption.close()
    writer.close()
    checkpoints.close()
    clock.lap("checkpoints")  # closing waits for the last save
  if index == 0:
    print(clock.line(c.stage), file=sys.stderr, flush=True)
  return last
