"""One training stage (sft, lm or dpo) on any mesh: `train_and_evaluate(config, workdir)`.

Flow: config -> data (tokenized, batched deterministically) -> mesh -> abstract
parameters and their shardings -> frozen base streamed from disk straight into
its shardings (quantized on the way) -> fresh or restored adapters and
optimizer state -> one jitted step (gradient accumulation inside, state
donated) -> checkpoints, metrics, eval.

The trainable leaves (LoRA A/B by default) and the frozen ones are separate
trees: gradients and optimizer state exist only for the trainable tree.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from anita_jax.train import checkpoint as ckpt
from anita_jax.data import rows as D
from anita_jax.convert import loading
from anita_jax.model import lora as LA
from anita_jax.model import losses
from anita_jax.data import preference
from anita_jax.model import quant as Q
from anita_jax.model import sharding as S
from anita_jax.train import config as stage_config
from anita_jax.train import workdir as W
from anita_jax.errors import Preempted, UserError
from anita_jax.train.metrics import MetricsWriter
from anita_jax.model.llama import Llama


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the jitted step needs to know, as static values."""

  stage: str
  grad_accum: int
  head_chunk: int = 16  # positions per chunk of the fused head and log-softmax (`losses.head_token_stats`)
  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  sft_weight: float = 0.0
  has_dropout: bool = False


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int):
  """(optax transformation, schedule): global-norm clipping, then AdamW with warmup + decay."""
  t = c.train
  warmup = t.warmup_steps or int(math.ceil(t.warmup_ratio * total_steps))
  warmup = min(warmup, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  after = {"linear": optax.linear_schedule(t.lr, 0.0, decay_steps),
           "cosine": optax.cosine_decay_schedule(t.lr, decay_steps),
           "constant": optax.constant_schedule(t.lr)}[t.schedule]
  schedule = optax.join_schedules([optax.linear_schedule(0.0, t.lr, max(warmup, 1)), after], [warmup])
  # As transformers' Trainer: no weight decay on norm scales (1-D leaves).
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  tx = optax.chain(optax.clip_by_global_norm(t.max_grad_norm) if t.max_grad_norm > 0 else optax.identity(),
                   optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay, mask=decay_mask))
  return tx, schedule


def _forward(model, trainable, frozen, batch, rng, spec: StepSpec, logits: bool = True, **model_kwargs):
  params = LA.combine(trainable, frozen)
  rngs = {"dropout": rng} if spec.has_dropout else {}
  out, _ = model.clone(**model_kwargs).apply(
      {"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"], rngs=rngs, logits=logits)
  return out


def _token_stats(model, trainable, frozen, batch, rng, spec: StepSpec, **model_kwargs):
  """`losses.token_stats` of the model on `batch`: token log-probs and mean logits [B, T].

  With a frozen head (the LoRA stages) the head and the log-softmax run fused,
  a few positions at a time: the [B, T, V] logits are never materialised.
  """
  head = frozen.get("lm_head", {}).get("kernel")
  vocab_major = head is None and model.config.tie_word_embeddings
  if vocab_major:
    head = frozen.get("embed_tokens", {}).get("embedding")
  if head is None:  # a trained head: its gradient needs the plain logits
    return losses.token_stats(_forward(model, trainable, frozen, batch, rng, spec, **model_kwargs),
                              batch["input_ids"])
  hidden = _forward(model, trainable, frozen, batch, rng, spec, logits=False, **model_kwargs)
  return losses.head_token_stats(hidden, head, batch["input_ids"], vocab_major=vocab_major, chunk=spec.head_chunk)


def loss_fn(model, trainable, frozen, batch, rng, spec: StepSpec, num_tokens):
  """(loss of this micro-batch's share of the step, metrics sums)."""
  logp, mean_logit = _token_stats(model, trainable, frozen, batch, rng, spec)
  if spec.stage != "dpo":
    sum_nll, count = losses.nll_terms(logp, batch)
    denominator = jnp.maximum(count, 1.0) if num_tokens is None else num_tokens
    loss = sum_nll / denominator  # as losses.cross_entropy_loss
    return loss, {"loss": loss, "tokens": count}
  logps, ntok, mean_logit = losses.completion_stats(logp, mean_logit, batch["loss_mask"])
  if "ref_logps" in batch:
    ref = batch["ref_logps"]
  else:  # the same weights with the adapters switched off: no second copy
    ref_stats = _token_stats(model, jax.lax.stop_gradient(trainable), frozen, batch, rng, spec,
                             adapters_enabled=False, deterministic=True)
    ref = jax.lax.stop_gradient(losses.completion_stats(*ref_stats, batch["loss_mask"])[0])
  b = logps.shape[0] // 2
  sft_nll = None
  if spec.sft_weight:
    chosen = {k: v[:b] for k, v in batch.items() if k != "ref_logps"}
    sum_nll, count = losses.nll_terms(logp[:b], chosen)
    sft_nll = sum_nll / jnp.maximum(count, 1.0)
  per_pair = losses.dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=spec.beta, loss_type=spec.loss_type,
                             label_smoothing=spec.label_smoothing, chosen_tokens=ntok[:b], rejected_tokens=ntok[b:])
  loss = jnp.mean(per_pair)
  if sft_nll is not None:
    loss = loss + spec.sft_weight * sft_nll
  loss = loss / spec.grad_accum
  metrics = losses.dpo_metrics(logps[:b], logps[b:], ref[:b], ref[b:], beta=spec.beta, chosen_tokens=ntok[:b],
                               rejected_tokens=ntok[b:], chosen_mean_logit=mean_logit[:b],
                               rejected_mean_logit=mean_logit[b:])
  metrics = {k: v / spec.grad_accum for k, v in metrics.items()}
  return loss, {"loss": loss, "tokens": jnp.sum(ntok, dtype=jnp.float32), **metrics}


def train_step(model, tx, spec: StepSpec, state, frozen, batches, rng):
  """One optimizer step over `batches` (leaves [A, B, T]): returns (state, metrics)."""
  num_tokens = None
  if spec.stage != "dpo":  # the whole step's target count: micro-batch losses then add up to its mean
    num_tokens = jnp.sum(jax.vmap(losses.target_mask)(batches), dtype=jnp.float32)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True)

  def micro(carry, xs):
    grads, sums = carry
    batch, key = xs
    (_, metrics), g = grad_fn(state["params"], frozen, batch, key, spec, num_tokens)
    grads = jax.tree.map(jnp.add, grads, g)
    sums = jax.tree.map(jnp.add, sums, metrics)
    return (grads, sums), None

  keys = jax.random.split(jax.random.fold_in(rng, state["step"]), spec.grad_accum)
  zeros = jax.tree.map(jnp.zeros_like, state["params"])
  first = jax.tree.map(lambda x: x[0], batches)
  metric_shapes = jax.eval_shape(lambda: loss_fn(model, state["params"], frozen, first, keys[0], spec,
                                                 num_tokens)[1])
  sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
  (grads, metrics), _ = jax.lax.scan(micro, (zeros, sums0), (batches, keys))
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # A non-finite loss or gradient never reaches the state: the old state is kept, decided on device
  # (no host sync). The loop then stops at its next sync (train.on_nonfinite=stop) or goes on (skip).
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), params, state["params"])
  opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state, state["opt_state"])
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
  return new_state, {**metrics, "grad_norm": grad_norm, "finite": finite}


def eval_step(model, spec: StepSpec, params, frozen, batch):
  """Sums over one eval batch: (sum of losses weighted for averaging, weight, extra metrics)."""
  spec = dataclasses.replace(spec, grad_accum=1, has_dropout=False)
  if spec.stage != "dpo":
    logp, _ = _token_stats(model, params, frozen, batch, None, spec, deterministic=True)
    sum_nll, count = losses.nll_terms(logp, batch)
    return {"loss_sum": sum_nll, "weight": count}
  loss, metrics = loss_fn(model.clone(deterministic=True), params, frozen, batch, None, spec, None)
  n = jnp.float32(batch["input_ids"].shape[0] // 2)
  return {"loss_sum": loss * n, "weight": n, "acc_sum": metrics["rewards/accuracies"] * n,
          "margin_sum": metrics["rewards/margins"] * n}


# ----------------------------------------------------------------------------------------------
# Setting up a stage


def _sources(value: str) -> list[str]:
  return [s.strip() for s in str(value).split(",") if s.strip()]


def build_data(c, tokenizer, *, split_field="split", source_field="train", shuffle_seed=None,
               num_processes=1, process_index=0):
  """(iterator, stats) for data.train (or data.eval)."""
  rows = D.load_rows(_sources(c.data[source_field]), split=c.data[split_field], config_name=c.data.config_name,
                     fmt=c.data.format, max_rows=c.data.max_rows)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  seed = c.train.seed if shuffle_seed is None else shuffle_seed
  if c.stage == "dpo":
    examples, stats = preference.encode_preferences(rows, tokenizer, max_length=c.data.max_length,
                                                    max_prompt_length=c.data.max_prompt_length)
    it = preference.PreferenceBatchIterator(examples, batch_size=c.train.batch_size, max_length=c.data.max_length,
                                            seed=seed, pad_id=pad, num_processes=num_processes,
                                            process_index=process_index)
  else:
    fmt = "text" if c.stage == "lm" and c.data.format == "auto" else None
    examples, stats = D.encode_dataset(rows, tokenizer, max_length=c.data.max_length, mask=c.data.mask,
                                       truncation=c.data.truncation, fmt=fmt)
    it = D.BatchIterator(examples, batch_size=c.train.batch_size, max_length=c.data.max_length, seed=seed,
                         packing=c.data.packing, pad_id=pad, num_processes=num_processes,
                         process_index=process_index)
  return it, stats


@dataclasses.dataclass
class Stage:
  """Everything a stage's loop, eval and export need, built once."""

  config: ml_collections.ConfigDict
  model: Llama
  mesh: jax.sharding.Mesh
  frozen: dict
  state: dict
  state_shardings: dict
  frozen_shardings: dict
  tokenizer: object
  model_config: object
  spec: LA.LoraSpec
  step_spec: StepSpec
  base_path: str


def _model(c, model_config, spec) -> Llama:
  dtype = jnp.dtype(c.model.dtype)
  return Llama(model_config, dtype=dtype, param_dtype=dtype, scan_layers=c.model.scan_layers,
               remat_policy=c.model.remat, lora=spec, quant=Q.QuantSpec(c.quant.type, c.quant.block_size,
                                                                         c.quant.double_quant),
               deterministic=c.lora.dropout == 0, attention=c.model.attention)


def _head_chunk(c, model_config, mesh) -> int:
  """Positions per chunk of the fused head: one device's chunk of logits stays under 2^23 elements
  on CPU (about the last-level cache) and 2^26 on accelerators (large matmuls, 256 MB in fp32)."""
  rows = c.train.batch_size * (2 if c.stage == "dpo" else 1)
  local_rows = max(1, rows // (mesh.shape["data"] * mesh.shape["fsdp"]))
  budget = 2 ** 23 if mesh.devices.flat[0].platform == "cpu" else 2 ** 26
  chunk = max(1, budget // (local_rows * model_config.vocab_size))
  return min(1 << (chunk.bit_length() - 1), c.data.max_length)


def _step_spec(c, model_config, mesh) -> StepSpec:
  if c.stage == "dpo":
    losses.check_dpo_options(c.dpo.loss_type, c.dpo.label_smoothing)
  return StepSpec(stage=c.stage, grad_accum=c.train.grad_accum, head_chunk=_head_chunk(c, model_config, mesh),
                  beta=c.dpo.beta, loss_type=c.dpo.loss_type, label_smoothing=c.dpo.label_smoothing,
                  sft_weight=c.dpo.sft_weight, has_dropout=c.lora.dropout > 0)


def _trainable_groups(c) -> tuple[str, ...]:
  return tuple(g.strip() for g in c.train.trainable.split(",") if g.strip())


def abstract_stage(c: ml_collections.ConfigDict, model_config, mesh, tokenizer=None, base_path: str = "") -> Stage:
  """The stage with shapes only: `state` and `frozen` hold ShapeDtypeStructs carrying their shardings.

  Enough to lower and compile the train step for any mesh (ahead-of-time
  compilation for TPU topologies) without reading a single weight.
  """
  spec = LA.make_spec(c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora, c.lora.targets)
  qspec = Q.QuantSpec(c.quant.type, c.quant.block_size, c.quant.double_quant)
  for name, (d_in, _) in LA.projection_dims(model_config).items():
    qspec.validate(d_in, name)
  model = _model(c, model_config, spec)
  # Shapes only; the attention kind has no parameters, and the kernel would want a mesh in context.
  boxed = jax.eval_shape(model.clone(attention="dot").init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  shardings = S.shardings_of(boxed, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  trainable, frozen = LA.partition(abstract, LA.trainable_mask(abstract, _trainable_groups(c)))
  # Groups other than the adapters (norms, embeddings, lm_head) train in fp32.
  trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), trainable)
  tx, _ = make_optimizer(c, 1)  # the state's layout does not depend on the schedule
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
  opt_abstract = jax.eval_shape(tx.init, trainable)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_shardings,
                                        transform_non_params=lambda _: replicated)
  opt_abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_abstract,
                              opt_shardings)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), "params": trainable,
           "opt_state": opt_abstract}
  state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
  return Stage(c, model, mesh, frozen, state, state_shardings, jax.tree.map(lambda x: x.sharding, frozen),
               tokenizer, model_config, spec, _step_spec(c, model_config, mesh), base_path)


def build_stage(c: ml_collections.ConfigDict, mesh=None) -> Stage:
  """The stage with real arrays: the frozen base streamed from disk into its shardings
  (quantized on the way), fresh adapters and optimizer state (step 0)."""
  base_path = W.base_model_path(c)
  model_config = loading.load_config(base_path)
  tokenizer = loading.load_tokenizer(c.model.tokenizer or base_path)
  loading.check_tokenizer(tokenizer, model_config, c.model.tokenizer or base_path)
  mesh = mesh or S.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  stage = abstract_stage(c, model_config, mesh, tokenizer, base_path)
  qspec = Q.QuantSpec(c.quant.type, c.quant.block_size, c.quant.double_quant)
  flat_sh = {**LA.flatten(stage.frozen_shardings), **LA.flatten(stage.state_shardings["params"])}
  transform = loading.leaf_transform(qspec, c.model.dtype,
                                     place=lambda path, x: jax.tree.map(S.place, x, flat_sh[path]))
  _, base = loading.load_weights(base_path, scan_layers=c.model.scan_layers, transform=transform)
  groups = _trainable_groups(c)
  moved, frozen = LA.partition(base, LA.trainable_mask(base, groups))
  moved = jax.tree.map(lambda x: x.astype(jnp.float32), moved)
  adapter_sh = LA.partition(stage.state_shardings["params"],
                            LA.trainable_mask(stage.state_shardings["params"], ("lora",)))[0]
  init_adapters = jax.jit(lambda key: LA.init_adapters(key, model_config, stage.spec, c.model.scan_layers),
                          out_shardings=adapter_sh)
  params = LA.combine(init_adapters(jax.random.key(c.train.seed)), moved)
  tx, _ = make_optimizer(c, 1)
  opt_state = jax.jit(tx.init, out_shardings=stage.state_shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), stage.state_shardings["step"])
  return dataclasses.replace(stage, frozen=frozen, state={"step": step, "params": params, "opt_state": opt_state})


def restore_latest(stage: Stage, checkpoints: ckpt.Checkpoints) -> tuple[dict, dict | None]:
  """(state, data state) of the latest checkpoint, or the fresh state and None."""
  step = checkpoints.latest_step()
  if step is None:
    return stage.state, None
  return checkpoints.restore(step, stage.state)


def _check_resume(c, workdir: str) -> None:
  """A workdir resumes only the run it was made for: same base model, LoRA shape, quantization."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  for field in ("stage", "init_from", "merge_into", "model.path", "lora.rank", "lora.targets", "lora.rslora",
                "lora.alpha", "quant.type", "quant.block_size", "quant.double_quant", "model.scan_layers",
                "train.trainable"):
    a, b = old, c.to_dict()
    for key in field.split("."):
      a, b = (a or {}).get(key), (b or {}).get(key)
    if a != b:
      raise UserError(f"{path}: this workdir was trained with {field}={a!r}, not {b!r}; use a new --workdir "
                      "or the original setting")


def _write_json(path: str, value) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _stack(batches: list[dict]) -> dict:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def in_mesh(mesh, jitted):
  """`jitted`, traced, lowered (`.lower`) and run under `mesh` and the logical-axis rules.

  The model's activation constraints take effect only there, and the splash
  kernel's `shard_map` needs the mesh in context.
  """

  def under(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
      with jax.set_mesh(mesh), nn.logical_axis_rules(S.DEFAULT_RULES):
        return fn(*args, **kwargs)

    return call

  call = under(jitted)
  call.lower = under(jitted.lower)
  return call


def compile_step(stage: Stage, tx, data_shardings):
  """The jitted train step with explicit shardings, under the stage's mesh (`in_mesh`); the state is donated."""
  step = functools.partial(train_step, stage.model, tx, stage.step_spec)
  replicated = jax.sharding.NamedSharding(stage.mesh, jax.sharding.PartitionSpec())
  return in_mesh(stage.mesh, jax.jit(
      step, in_shardings=(stage.state_shardings, stage.frozen_shardings, data_shardings, replicated),
      out_shardings=(stage.state_shardings, replicated), donate_argnums=(0,)))


def evaluate(stage: Stage, params, eval_iter, eval_fn) -> dict:
  """Mean eval loss (token-weighted for sft/lm; pair mean for dpo) over one pass of the eval set."""
  eval_iter.restore((0, 0))
  totals: dict = {}
  for _ in range(eval_iter.steps_in_epoch(0)):
    batch = {k: S.place_local(v, S.batch_sharding(stage.mesh)) for k, v in next(eval_iter).items()}
    for k, v in eval_fn(params, stage.frozen, batch).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  out = {"eval_loss": totals["loss_sum"] / max(totals["weight"], 1.0)}
  if "acc_sum" in totals:
    out["eval_rewards/accuracies"] = totals["acc_sum"] / totals["weight"]
    out["eval_rewards/margins"] = totals["margin_sum"] / totals["weight"]
  return out


def reference_logps(stage: Stage, examples, batch_size: int, max_length: int, pad_id: int) -> np.ndarray:
  """[N, 2] summed completion log-probs (chosen, rejected) of every pair under the reference
  (the base, adapters disabled), in one pass; the same numbers `dpo.reference=base` computes."""

  @functools.partial(in_mesh, stage.mesh)
  @jax.jit
  def logps(frozen, params, batch):
    stats = _token_stats(stage.model, params, frozen, batch, None, stage.step_spec, adapters_enabled=False,
                         deterministic=True)
    return losses.completion_stats(*stats, batch["loss_mask"])[0]

  out = np.zeros((len(examples), 2), np.float32)
  sharding = S.batch_sharding(stage.mesh)
  for start in range(0, len(examples), batch_size):
    pairs = list(range(start, min(start + batch_size, len(examples))))
    pairs += [pairs[-1]] * (batch_size - len(pairs))  # a fixed shape: one compile
    local = preference.build_batch(examples, pairs, 0, 2 * batch_size, max_length, pad_id)
    batch = {k: S.place(v, sharding) for k, v in local.items()}
    values = np.asarray(jax.device_get(logps(stage.frozen, stage.state["params"], batch)))
    out[pairs, 0], out[pairs, 1] = values[:batch_size], values[batch_size:]
  return out


def _cached_reference(stage: Stage, it, workdir: str) -> np.ndarray:
  path = os.path.join(workdir, "reference_logps.npy")
  if os.path.isfile(path):
    ref = np.load(path, allow_pickle=False)
    if ref.shape == (len(it.examples), 2):
      return ref
  c = stage.config
  ref = reference_logps(stage, it.examples, c.train.batch_size, c.data.max_length, it.pad_id)
  if jax.process_index() == 0:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, ref, allow_pickle=False)
    os.replace(tmp, path)
  return ref


def _reference_rows(it, ref: np.ndarray) -> np.ndarray:
  """This process's rows of the next batch's reference log-probs ([2B] global rows: chosen, then rejected)."""
  epoch, index = it.state()
  while index >= it.steps_in_epoch(epoch):
    epoch, index = epoch + 1, 0
  b = it.batch_size
  pairs = [g[0] for g in it.groups(epoch)[index * b:(index + 1) * b]]
  share = 2 * b // it.num_processes
  rows = range(it.process_index * share, (it.process_index + 1) * share)
  return np.asarray([ref[pairs[r % b], 0 if r < b else 1] for r in rows], np.float32)


def _next_batch(it, ref):
  rows = None if ref is None else _reference_rows(it, ref)
  batch = next(it)
  if rows is not None:
    batch["ref_logps"] = rows
  return batch


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


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None) -> dict:
  """Runs (or resumes) one stage in `workdir`; returns the last logged metrics.

  stop_after: end (with a checkpoint) once this step is reached, as a preemption would.
  Raises Preempted after saving, when SIGTERM arrived during the run.
  """
  stage_config.validate(c)
  _check_resume(c, workdir)
  processes, index = jax.process_count(), jax.process_index()
  stage = build_stage(c)
  shards = stage.mesh.shape["data"] * stage.mesh.shape["fsdp"]
  if c.train.batch_size % shards:
    raise UserError(f"config field 'train.batch_size'={c.train.batch_size}: not divisible by mesh.data x mesh.fsdp "
                    f"= {shards}, the devices the batch is split over")
  train_iter, stats = build_data(c, stage.tokenizer, num_processes=processes, process_index=index)
  print(f"train data: {stats}", file=sys.stderr, flush=True)
  eval_iter = None
  if c.data.eval:
    eval_c = ml_collections.ConfigDict(c.to_dict())
    eval_c.train.batch_size = min(c.train.batch_size, 8 * processes)
    eval_iter, eval_stats = build_data(eval_c, stage.tokenizer, split_field="eval_split", source_field="eval",
                                       num_processes=processes, process_index=index)
    print(f"eval data: {eval_stats}", file=sys.stderr, flush=True)
  per_epoch = train_iter.steps_for_epochs(c.train.epochs) // c.train.grad_accum
  total = c.train.steps or max(per_epoch, 1)

  os.makedirs(workdir, exist_ok=True)
  if index == 0:
    _write_json(os.path.join(workdir, "config.json"), c.to_dict())
  checkpoints = ckpt.Checkpoints(workdir, c.checkpoint.keep)
  tx, schedule = make_optimizer(c, total)
  state, data_state = restore_latest(stage, checkpoints)
  if data_state is not None:
    train_iter.restore((data_state["epoch"], data_state["index"]))
  ref = None
  if c.stage == "dpo" and c.dpo.reference == "precomputed":
    ref = _cached_reference(stage, train_iter, workdir)
  data_sharding = {"input_ids": S.batch_sharding(stage.mesh, 3, leading=1)}
  data_sharding = {k: data_sharding["input_ids"] for k in ("input_ids", "loss_mask", "segment_ids", "positions")}
  if ref is not None:
    data_sharding["ref_logps"] = S.batch_sharding(stage.mesh, 2, leading=1)
  step_fn = compile_step(stage, tx, data_sharding)
  eval_fn = in_mesh(stage.mesh, jax.jit(functools.partial(eval_step, stage.model, stage.step_spec)))
  writer = MetricsWriter(workdir, total)
  rng = jax.random.key(c.train.seed + 1)
  last: dict = {}
  step = int(state["step"])
  if step == 0 and eval_iter is not None and c.train.eval_on_start:
    writer.write(0, evaluate(stage, state["params"], eval_iter, eval_fn))
  # Non-finite steps since the last sync, counted on device: no host sync per step.
  skipped, first_bad = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
  skipped_total = 0
  preemption = _Preemption()
  started, tokens = time.time(), 0.0
  try:
    while step < total:
      local = _stack([_next_batch(train_iter, ref) for _ in range(c.train.grad_accum)])
      batch = {k: S.place_local(v, data_sharding[k]) for k, v in local.items()}
      state, metrics = step_fn(state, stage.frozen, batch, rng)
      step += 1
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
        if eval_iter is not None and (is_last or (c.train.eval_every and step % c.train.eval_every == 0)):
          last.update(evaluate(stage, state["params"], eval_iter, eval_fn))
        writer.write(step, last)
        writer.progress(step, last)
      if saving:
        epoch, batch_index = train_iter.state()
        checkpoints.save(step, state, {"epoch": epoch, "index": batch_index}, force=True)
      if preempted:
        raise Preempted(f"{workdir}: SIGTERM received; saved the checkpoint of step {step}; re-run the same "
                        "command to resume")
      if stopping:
        break
  finally:
    preemption.close()
    writer.close()
    checkpoints.close()
  return last
