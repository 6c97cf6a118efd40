"""A stage's model, parameters and optimizer state, laid out on the mesh.

`abstract_stage` has shapes and shardings only (enough to compile the step
ahead of time); `build_stage` streams the frozen base from disk straight into
its shardings (quantized on the way) and adds fresh adapters and optimizer
state; `trained_model` restores a checkpoint's adapters beside the frozen base
and builds no optimizer state (generation, evaluation, export).

The trainable leaves (LoRA A/B by default) and the frozen ones are separate
trees: gradients and optimizer state exist only for the trainable tree.
"""

from __future__ import annotations

import contextvars
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from anita_jax.convert import loading
from anita_jax.errors import UserError
from anita_jax.model import flash as FL
from anita_jax.model import lora as LA
from anita_jax.model import tree as PT
from anita_jax.model import quant as Q
from anita_jax.model import sharding as S
from anita_jax.model.llama import Llama
from anita_jax.train import config as C
from anita_jax.train.checkpoint import Checkpoints
from anita_jax.train.objective import StepSpec, dpo_options
from anita_jax.train.optim import make_optimizer
from anita_jax.train.objectives import objective


@dataclasses.dataclass
class Stage:
  """Everything a stage's loop, eval and export need, built once."""

  config: C.StageConfig
  model: Llama
  mesh: jax.sharding.Mesh
  frozen: dict
  state: dict  # {"step", "params" (the trainable tree), "opt_state"}; no opt_state in `trained_model`'s
  state_shardings: dict
  frozen_shardings: dict
  tokenizer: object
  model_config: object
  spec: LA.LoraSpec
  step_spec: StepSpec
  base_path: str

  def reference_model(self) -> tuple[Llama, dict]:
    """(model, params) of `dpo.reference_model` on this stage's mesh, for the objective's reference pass (dpo.py,
    which sits below this module, asks the stage): loaded afresh, kept by the caller only while it needs it."""
    return load_reference_model(self.config, self.mesh, self.model_config, self.tokenizer)


def quant_spec(c: C.StageConfig) -> Q.QuantSpec:
  return Q.QuantSpec(c.quant.type, c.quant.block_size, c.quant.double_quant)


def lora_spec(c: C.StageConfig, frozen_rank: int = 0) -> LA.LoraSpec:
  spec = LA.make_spec(c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora, c.lora.targets)
  return dataclasses.replace(spec, frozen_rank=frozen_rank)


def make_model(c: C.StageConfig, model_config, spec: LA.LoraSpec) -> Llama:
  dtype = jnp.dtype(c.model.dtype)
  if c.model.attention == "flash":  # one error line before anything compiles, not a kernel traceback
    FL.check(model_config.head_dim, micro_batch_shape(c)[1], dtype)
  return Llama(model_config, dtype=dtype, param_dtype=dtype, scan_layers=c.model.scan_layers,
               remat_policy=c.model.remat, lora=spec, quant=quant_spec(c), deterministic=c.lora.dropout == 0,
               attention=c.model.attention)


def micro_batch_shape(c: C.StageConfig) -> tuple[int, int]:
  """(rows, tokens per row) of one micro-batch, as the stage's objective lays it out."""
  return objective(c.stage).batch_shape(c)


def _head_chunk(c: C.StageConfig, model_config, mesh) -> int:
  """Positions per chunk of the fused head: one device's chunk of logits stays under 2^23 elements
  on CPU (about the last-level cache) and 2^26 on accelerators (large matmuls, 256 MB in fp32)."""
  rows, length = micro_batch_shape(c)
  local_rows = max(1, rows // (mesh.shape["data"] * mesh.shape["fsdp"]))
  budget = 2 ** 23 if mesh.devices.flat[0].platform == "cpu" else 2 ** 26
  chunk = max(1, budget // (local_rows * model_config.vocab_size))
  return min(1 << (chunk.bit_length() - 1), length)


def step_spec(c: C.StageConfig, model_config, mesh) -> StepSpec:
  objective(c.stage).check(c)
  return StepSpec(stage=c.stage, grad_accum=c.train.grad_accum, head_chunk=_head_chunk(c, model_config, mesh),
                  has_dropout=c.lora.dropout > 0, **dpo_options(c.dpo))


def _abstract_params(model: Llama, mesh) -> dict:
  """The model's parameters as ShapeDtypeStructs carrying their shardings on `mesh`."""
  # Shapes only; the attention kind has no parameters, and the kernel would want a mesh in context.
  boxed = jax.eval_shape(model.clone(attention="dot").init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                      S.shardings_of(boxed, mesh))


def abstract_stage(c, model_config, mesh, tokenizer=None, base_path: str = "", *,
                   with_optimizer: bool = True, frozen_rank: int = 0) -> Stage:
  """The stage with shapes only: `state` and `frozen` hold ShapeDtypeStructs carrying their shardings.

  Enough to lower and compile the train step for any mesh (ahead-of-time
  compilation for TPU topologies) without reading a single weight.
  frozen_rank: of the earlier stages' frozen adapters in a stacked stage (`LoraSpec.frozen_rank`).
  """
  c = C.freeze(c)
  spec = lora_spec(c, frozen_rank)
  for name, (d_in, _) in LA.projection_dims(model_config).items():
    quant_spec(c).validate(d_in, name)
  model = make_model(c, model_config, spec)
  abstract = _abstract_params(model, mesh)
  for group in C.trainable_groups(c):  # e.g. lm_head of a model whose head is its (tied) embedding
    if not any(jax.tree.leaves(PT.trainable_mask(abstract, (group,)))):
      raise UserError(f"config field 'train.trainable'={c.train.trainable!r}: '{group}' names no weight of this "
                      "model" + (" (its head is the tied embedding: train embed_tokens)"
                                 if group == "lm_head" and model_config.tie_word_embeddings else ""))
  trainable, frozen = PT.partition(abstract, PT.trainable_mask(abstract, C.trainable_groups(c)))
  # Groups other than the adapters (norms, embeddings, lm_head) train in fp32.
  trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), trainable)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), "params": trainable}
  state_shardings = {"step": replicated, "params": param_shardings}
  if with_optimizer:
    tx, _ = make_optimizer(c.train, 1)  # the state's layout does not depend on the schedule
    opt_abstract = jax.eval_shape(tx.init, trainable)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_shardings,
                                          transform_non_params=lambda _: replicated)
    state["opt_state"] = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      opt_abstract, opt_shardings)
    state_shardings["opt_state"] = opt_shardings
  return Stage(c, model, mesh, frozen, state, state_shardings, jax.tree.map(lambda x: x.sharding, frozen),
               tokenizer, model_config, spec, step_spec(c, model_config, mesh), base_path)


class BaseCache:
  """The last base loaded, in its final (quantized, placed) form, for whatever asks next for the same files in
  the same form, while the cache is open (`with BaseCache():`).

  The recipe's stages, exports and report models all stand on one base, and importing and quantizing an 8B
  base takes minutes each time; the recipe opens one cache for its run. One entry: a different base replaces it
  before it is read. Leaving the `with` block drops the arrays (outside one, every load imports). Frozen leaves
  are never donated or changed in place, so sharing them is safe.
  """

  def __init__(self):
    self.key, self.value, self._token = None, None, None

  def get(self, key, load):
    if self.value is None or self.key != key:
      self.clear()
      self.key, self.value = key, load()
    return self.value

  def clear(self) -> None:
    self.key, self.value = None, None

  def __enter__(self) -> "BaseCache":
    self._token = _OPEN_CACHE.set(self)
    return self

  def __exit__(self, *exc) -> None:
    _OPEN_CACHE.reset(self._token)
    self.clear()


_OPEN_CACHE: contextvars.ContextVar[BaseCache | None] = contextvars.ContextVar("base_cache", default=None)


def _cached_base(key, load):
  cache = _OPEN_CACHE.get()
  return load() if cache is None else cache.get(key, load)


def _load(c: C.StageConfig, base_path: str, mesh, with_optimizer: bool, frozen_adapters) -> tuple[Stage, dict]:
  """(abstract stage, the base's trainable non-adapter leaves) with `stage.frozen` loaded from base_path
  (and the earlier stages' adapters `frozen_adapters`, (rank, tree of host arrays), for a stacked stage)."""
  model_config = loading.load_config(base_path)
  tokenizer = loading.load_tokenizer(c.model.tokenizer or base_path)
  loading.check_tokenizer(tokenizer, model_config, c.model.tokenizer or base_path)
  mesh = mesh or S.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  frozen_rank, stacked = frozen_adapters or (0, {})
  stage = abstract_stage(c, model_config, mesh, tokenizer, base_path, with_optimizer=with_optimizer,
                         frozen_rank=frozen_rank)
  flat_sh = {**PT.flatten(stage.frozen_shardings), **PT.flatten(stage.state_shardings["params"])}
  transform = loading.leaf_transform(quant_spec(c), c.model.dtype,
                                     place=lambda path, x: jax.tree.map(S.place, x, flat_sh[path]))
  adapter = LA.LORA_LEAVES + LA.FROZEN_LEAVES  # not read from base_path: a stacked stage shares its base
  key = (loading.weights_fingerprint(base_path), quant_spec(c), c.model.dtype, c.model.scan_layers,
         tuple((path, tuple(jax.tree.leaves(sh))) for path, sh in sorted(flat_sh.items()) if path[-1] not in adapter))
  base = _cached_base(key, lambda: loading.load_weights(base_path, scan_layers=c.model.scan_layers,
                                                        transform=transform)[1])
  abstract = PT.flatten(stage.frozen)  # the frozen adapters' dtype: the compute dtype (see model.Linear)
  base = PT.combine(base, PT.unflatten({p: S.place(np.asarray(v, np.float32).astype(abstract[p].dtype), flat_sh[p])
                                        for p, v in PT.flatten(stacked).items()}))
  moved, frozen = PT.partition(base, PT.trainable_mask(base, C.trainable_groups(c)))
  moved = jax.tree.map(lambda x: jnp.copy(x.astype(jnp.float32)), moved)  # trained and donated: not the cache's
  return dataclasses.replace(stage, frozen=frozen), moved


def build_stage(c, base_path: str, mesh=None, frozen_adapters=None) -> Stage:
  """The stage with real arrays: the frozen base streamed from disk into its shardings
  (quantized on the way), fresh adapters and optimizer state (step 0)."""
  c = C.freeze(c)
  if c.dpo.reference_model:  # refused before the base's weights are read, not after
    check_reference_model(c, loading.load_config(base_path), loading.load_tokenizer(c.model.tokenizer or base_path))
  stage, moved = _load(c, base_path, mesh, True, frozen_adapters)
  adapter_sh = PT.partition(stage.state_shardings["params"],
                            PT.trainable_mask(stage.state_shardings["params"], ("lora",)))[0]
  init_adapters = jax.jit(lambda key: LA.init_adapters(key, stage.model_config, stage.spec, c.model.scan_layers),
                          out_shardings=adapter_sh)
  params = PT.combine(init_adapters(jax.random.key(c.train.seed)), moved)
  tx, _ = make_optimizer(c.train, 1)
  opt_state = jax.jit(tx.init, out_shardings=stage.state_shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), stage.state_shardings["step"])
  return dataclasses.replace(stage, state={"step": step, "params": params, "opt_state": opt_state})


def check_reference_model(c: C.StageConfig, model_config, tokenizer):
  """The architecture (`ModelConfig`) of `dpo.reference_model`, once it is known to read token ids as the policy
  does (TRL's ref_model shares the policy's tokenizer): the same vocab_size and tokenizer vocabulary."""
  path = c.dpo.reference_model
  field = f"config field 'dpo.reference_model'={path}"
  try:
    ref_config, ref_tokenizer = loading.load_config(path), loading.load_tokenizer(path)
  except UserError as e:
    raise UserError(f"{field}: {str(e).removeprefix(f'{path}: ')}") from None
  if ref_config.vocab_size != model_config.vocab_size:
    raise UserError(f"{field}: its vocab_size is {ref_config.vocab_size}, the policy's {model_config.vocab_size}; "
                    "the reference must score the policy's token ids (the same tokenizer)")
  mine, theirs = tokenizer.get_vocab(), ref_tokenizer.get_vocab()
  if mine != theirs:
    differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda item: item[1])
    raise UserError(f"{field}: its tokenizer's vocabulary is not the policy's ({len(theirs)} and {len(mine)} "
                    f"tokens; first difference at id {differ[0][1]}); the reference must score the policy's token ids")
  return ref_config


def load_reference_model(c: C.StageConfig, mesh, model_config, tokenizer) -> tuple[Llama, dict]:
  """(model, params) of `dpo.reference_model` on `mesh`: dense in `model.dtype` (TRL's ref_model is the model as
  given, so `quant.*` is not applied), no adapters, read straight into its shardings; never cached (it is
  freed once the reference log-probs are computed)."""
  ref_config = check_reference_model(c, model_config, tokenizer)
  model = make_model(C.replace(c, **{"quant.type": "none"}), ref_config, None)
  flat_sh = PT.flatten(jax.tree.map(lambda x: x.sharding, _abstract_params(model, mesh)))
  transform = loading.leaf_transform(model.quant, c.model.dtype,
                                     place=lambda path, x: jax.tree.map(S.place, x, flat_sh[path]))
  _, params = loading.load_weights(c.dpo.reference_model, scan_layers=c.model.scan_layers, transform=transform)
  return model, params


def trained_model(c, base_path: str, checkpoints: Checkpoints, mesh=None, frozen_adapters=None) -> Stage:
  """The stage of a checkpoint, for inference: the frozen base and the latest checkpoint's trainable
  parameters in `state["params"]`; no optimizer state is built or read."""
  c = C.freeze(c)
  stage, _ = _load(c, base_path, mesh, False, frozen_adapters)
  step = checkpoints.latest_step()
  params = checkpoints.restore_params(step, stage.state["params"])
  return dataclasses.replace(stage, state={"step": step, "params": params})


def restore_latest(stage: Stage, checkpoints: Checkpoints) -> tuple[dict, dict | None]:
  """(state, data state) of the latest checkpoint, or the fresh state and None."""
  step = checkpoints.latest_step()
  if step is None:
    return stage.state, None
  return checkpoints.restore(step, stage.state)
