"""The jitted optimizer step and eval step of any stage, dispatched on its objective (`objectives`).

`train_step` runs `grad_accum` micro-batches in a scan (gradients summed, no
second copy of the state), then one optax update; a non-finite loss or
gradient never reaches the state. The stage's `Objective` supplies the loss.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from anita_jax.model import sharding as S
from anita_jax.train.objective import StepSpec
from anita_jax.train.objectives import OBJECTIVES

BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")  # every objective's token leaves
def train_step(model, tx, spec: StepSpec, state, frozen, batches, rng):
  """One optimizer step over `batches` (leaves [A, B, T]): returns (state, metrics)."""
  obj = OBJECTIVES[spec.stage]
  normalizer = obj.step_normalizer(batches)
  loss_fn = functools.partial(obj.loss, model)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(carry, xs):
    grads, sums = carry
    batch, key = xs
    (_, metrics), g = grad_fn(state["params"], frozen, batch, key, spec, normalizer)
    grads = jax.tree.map(jnp.add, grads, g)
    sums = jax.tree.map(jnp.add, sums, metrics)
    return (grads, sums), None

  keys = jax.random.split(jax.random.fold_in(rng, state["step"]), spec.grad_accum)
  zeros = jax.tree.map(jnp.zeros_like, state["params"])
  first = jax.tree.map(lambda x: x[0], batches)
  metric_shapes = jax.eval_shape(lambda: loss_fn(state["params"], frozen, first, keys[0], spec, normalizer)[1])
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
  """The objective's sums over one eval batch."""
  spec = dataclasses.replace(spec, grad_accum=1, has_dropout=False)
  return OBJECTIVES[spec.stage].eval_sums(model, spec, params, frozen, batch)


def compile_step(stage, tx, data_shardings):
  """The jitted train step with explicit shardings, under the stage's mesh (`in_mesh`); the state is donated."""
  step = functools.partial(train_step, stage.model, tx, stage.step_spec)
  replicated = jax.sharding.NamedSharding(stage.mesh, jax.sharding.PartitionSpec())
  return S.in_mesh(stage.mesh, jax.jit(
      step, in_shardings=(stage.state_shardings, stage.frozen_shardings, data_shardings, replicated),
      out_shardings=(stage.state_shardings, replicated), donate_argnums=(0,)))


def compile_eval(stage):
  return S.in_mesh(stage.mesh, jax.jit(functools.partial(eval_step, stage.model, stage.step_spec)))


def batch_shardings(c, mesh) -> dict:
  """Shardings of a step's batch leaves: [grad_accum, rows, T] tokens (`BATCH_KEYS`), plus the objective's extra
  inputs, split over (data, fsdp) along the rows."""
  out = {k: S.batch_sharding(mesh, 3, leading=1) for k in BATCH_KEYS}
  for name, (rank, _) in OBJECTIVES[c.stage].extra_inputs(c).items():
    out[name] = S.batch_sharding(mesh, rank, leading=1)
  return out