"""One training stage (sft, lm or dpo) on any mesh: `train_and_evaluate(config, workdir)`.

Flow: config -> data (tokenized, batched deterministically) -> mesh -> the
stage (`state.build_stage`: the frozen base streamed into its shardings,
quantized on the way; fresh adapters and optimizer state) or its latest
checkpoint -> one jitted step (`step.compile_step`: gradient accumulation
inside, state donated) -> checkpoints, metrics, eval. What is optimized comes
from the stage's `Objective` (`objectives.OBJECTIVES`).
A resumed run must be the run its checkpoints belong to (`resume`).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from anita_jax import files
from anita_jax.errors import Preempted, UserError
from anita_jax.model import sharding as S
from anita_jax.train import config as C
from anita_jax.train import resume as R
from anita_jax.train import state as ST
from anita_jax.train import objectives as OBJ
from anita_jax.train import step as STEP
from anita_jax.train import workdir as W
from anita_jax.train.checkpoint import Checkpoints
from anita_jax.train.data import build_data, load_source
from anita_jax.train.metrics import MetricsWriter
from anita_jax.train.optim import make_optimizer


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
  return OBJ.objective(stage.config.stage).eval_metrics(totals)


class _Clock:
  """Wall time per phase of a stage run, printed as one line at its end (where the time of a big stage goes).

  `order`: phases the line names first, in that order, whichever of them runs first."""

  def __init__(self, order: tuple[str, ...] = ()):
    self.seconds: dict[str, float] = dict.fromkeys(order, 0.0)
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


class _NonFinite:
  """Steps with a non-finite loss or gradient, counted on device since the last host sync (no sync per step);
  `sync` acts on them where the host syncs anyway (log and checkpoint steps)."""

  def __init__(self, policy: str):
    self.policy, self.total = policy, 0
    self._reset()

  def _reset(self) -> None:
    self.count, self.first = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)

  def add(self, step: int, finite) -> None:
    bad = jnp.logical_not(finite)
    self.first = jnp.where(bad & (self.count == 0), step, self.first)
    self.count = self.count + bad.astype(jnp.int32)

  def sync(self, step: int) -> None:
    n, where = int(self.count), int(self.first)
    self._reset()
    if n and self.policy == "stop":
      raise UserError(f"step {where}: the loss or gradient is not finite; training stopped and the last good "
                      "checkpoint is kept; lower train.lr or set train.on_nonfinite=skip")
    if n:
      self.total += n
      print(f"step {step}: skipped {n} step(s) with a non-finite loss or gradient (first: step {where}; "
            f"{self.total} in this run)", file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Run:
  """What a stage run sets up before its first step (`_set_up`) and its loop uses."""

  c: C.StageConfig
  workdir: str
  stage: ST.Stage
  train_iter: Any
  eval_iter: Any
  total: int
  state: dict
  prepared: Any
  shardings: dict
  step_fn: Any
  eval_fn: Any
  schedule: Any
  checkpoints: Checkpoints
  writer: MetricsWriter


def train_and_evaluate(c, workdir: str, stop_after: int | None = None) -> dict:
  """Runs (or resumes) one stage in `workdir`; returns the last logged metrics.

  c: the stage's ConfigDict or StageConfig.
  stop_after: end (with a checkpoint) once this step is reached, as a preemption would.
  Raises Preempted after saving, when SIGTERM arrived during the run.
  """
  c = C.freeze(c)
  C.validate(c)
  clock = _Clock(order=("import", "data"))
  run = _set_up(c, workdir, clock)
  preemption = _Preemption()
  try:
    last = _loop(run, clock, preemption, stop_after)
  finally:
    clock.lap("steps")  # nothing since the last lap, unless the loop ended early
    preemption.close()
    run.writer.close()
    run.checkpoints.close()
    clock.lap("checkpoints")  # closing waits for the last save
  if jax.process_index() == 0:
    print(clock.line(c.stage), file=sys.stderr, flush=True)
  return last


def _set_up(c: C.StageConfig, workdir: str, clock: _Clock) -> _Run:
  """Checks the resume, builds the stage and its data, restores the latest checkpoint and compiles the step."""
  # Loaded once: fingerprinted before the model, so a resumed run that may not go on stops in seconds.
  sources = {source: load_source(c, source) for source in ("train", "eval") if getattr(c.data, source)}
  fingerprints = R.fingerprints_of(sources)
  R.check(c, workdir, fingerprints)
  clock.lap("data")
  processes, index = jax.process_count(), jax.process_index()
  stage = ST.build_stage(c, W.base_model_path(c), frozen_adapters=W.frozen_adapters(c))
  clock.lap("import")
  C.check_batch_split(c, stage.mesh.shape["data"] * stage.mesh.shape["fsdp"])
  train_iter, stats = build_data(c, stage.tokenizer, num_processes=processes, process_index=index,
                                 workdir=workdir, rows=sources["train"])
  print(f"train data: {stats}", file=sys.stderr, flush=True)
  eval_iter = None
  if c.data.eval:
    eval_iter, eval_stats = build_data(c, stage.tokenizer, source="eval", num_processes=processes,
                                       process_index=index, batch_size=min(c.train.batch_size, 8 * processes),
                                       workdir=workdir, rows=sources["eval"])
    print(f"eval data: {eval_stats}", file=sys.stderr, flush=True)
  clock.lap("data")
  per_epoch = train_iter.steps_for_epochs(c.train.epochs) // c.train.grad_accum
  total = c.train.steps or max(per_epoch, 1)
  files.makedirs(workdir)
  if index == 0:
    R.record(c, workdir, fingerprints)
  checkpoints = Checkpoints(workdir, c.checkpoint.keep)
  tx, schedule = make_optimizer(c.train, total)
  state, data_state = ST.restore_latest(stage, checkpoints)
  if data_state is not None:
    train_iter.restore((data_state["epoch"], data_state["index"]))
  clock.lap("state")
  prepared = OBJ.objective(c.stage).prepare(stage, train_iter, workdir)
  clock.lap("prepare")  # DPO: the reference log-probs, when precomputed
  shardings = STEP.batch_shardings(c, stage.mesh)
  return _Run(c, workdir, stage, train_iter, eval_iter, total, state, prepared, shardings,
              STEP.compile_step(stage, tx, shardings), STEP.compile_eval(stage), schedule, checkpoints,
              MetricsWriter(workdir, total))


def _loop(run: _Run, clock: _Clock, preemption: _Preemption, stop_after: int | None) -> dict:
  """The steps from the restored one to `run.total`: log, evaluate and checkpoint on their schedules."""
  c, stage, obj = run.c, run.stage, OBJ.objective(run.c.stage)
  rng = jax.random.key(c.train.seed + 1)
  last: dict = {}
  step = first = int(run.state["step"])
  if step == 0 and run.eval_iter is not None and c.train.eval_on_start:
    run.writer.write(0, evaluate(stage, run.state["params"], run.eval_iter, run.eval_fn))
    clock.lap("eval")
  nonfinite = _NonFinite(c.train.on_nonfinite)
  started, tokens = time.time(), 0.0
  while step < run.total:
    local = _stack([obj.next_batch(run.train_iter, run.prepared) for _ in range(c.train.grad_accum)])
    batch = {k: S.place_local(v, run.shardings[k]) for k, v in local.items()}
    run.state, metrics = run.step_fn(run.state, stage.frozen, batch, rng)
    step += 1
    if step == first + 1:  # jit compiles on the first call
      jax.block_until_ready(metrics)
      clock.lap("compile + first step")
    nonfinite.add(step, metrics.pop("finite"))
    tokens += float(np.sum(local["segment_ids"] != 0)) * jax.process_count()
    is_last = step == run.total
    preempted = preemption.reached(step)
    stopping = preempted or (stop_after is not None and step >= stop_after)
    saving = step % c.checkpoint.every == 0 or is_last or stopping
    logging_ = step % c.train.log_every == 0 or is_last or step == 1
    if saving or logging_:  # the host syncs here anyway
      nonfinite.sync(step)
    row: dict = {}  # this step's metrics.jsonl row: training metrics on logging steps, eval on its own schedule
    if logging_:
      row = _train_row(metrics, run.schedule(step - 1), tokens / (time.time() - started), nonfinite.total)
      started, tokens = time.time(), 0.0
    if run.eval_iter is not None and (is_last or (c.train.eval_every and step % c.train.eval_every == 0)):
      jax.block_until_ready(run.state)
      clock.lap("steps")
      paused = time.time()
      row.update(evaluate(stage, run.state["params"], run.eval_iter, run.eval_fn))
      started += time.time() - paused  # tokens_per_second counts training time only
      clock.lap("eval")
    if row:
      last = row if logging_ else {**last, **row}
      run.writer.write(step, row)
      run.writer.progress(step, row)
    if saving:
      epoch, batch_index = run.train_iter.state()
      jax.block_until_ready(run.state)
      clock.lap("steps")
      run.checkpoints.save(step, run.state, {"epoch": epoch, "index": batch_index}, force=True)
      clock.lap("checkpoints")
    if preempted:
      raise Preempted(f"{run.workdir}: SIGTERM received; saved the checkpoint of step {step}; re-run the same "
                      "command to resume")
    if stopping:
      break
  return last


def _train_row(metrics: dict, learning_rate, tokens_per_second: float, skipped: int) -> dict:
  """A logging step's training metrics, as floats under their logged names."""
  row = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
  row.update(learning_rate=float(learning_rate), tokens_per_second=tokens_per_second)
  if skipped:
    row["skipped_steps"] = float(skipped)
  return row
