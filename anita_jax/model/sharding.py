"""The device mesh, the logical-axis rules, and placing arrays into their shardings.

The model names its axes (`embed`, `mlp`, `q_heads`, `activation_batch`, ...);
one table of rules maps those names onto the mesh axes `data`, `fsdp` and
`tensor`. A weight dimension that its mesh axes do not divide stays unsharded
on them (one warning per kind), so any mesh runs any model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from anita_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# MaxText's scheme: weights fully sharded over fsdp (ZeRO-3 style) and split over tensor.
DEFAULT_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # Last, so it takes fsdp only where the factor's other axis did not: a LoRA factor (A [in, R], B [R, out])
    # is then sharded over fsdp whichever projection it adapts, never replicated there.
    ("lora_rank", "fsdp"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise UserError(f"mesh.{free[1]}=-1: only one mesh size may be -1")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise UserError(f"mesh.{k}={v}: must be a positive size or -1")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if len(devices) % fixed:
      raise UserError(f"mesh: {len(devices)} devices are not divisible by the fixed mesh sizes "
                      f"({', '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)})")
    sizes[free[0]] = len(devices) // fixed
  used = math.prod(sizes.values())
  if len(devices) % used:
    raise UserError(f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = {used} does not "
                    f"divide the {len(devices)} devices")
  if used < len(devices):
    logging.warning("mesh: using %d of the %d devices", used, len(devices))
    devices = devices[:used]
  shape = tuple(sizes[k] for k in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _spec(names: Sequence[str | None], shape: Sequence[int], mesh, rules, what: str, warned: set) -> P:
  """The PartitionSpec of logical `names`, dropping mesh axes that do not divide a dimension."""
  axes = nn.logical_to_mesh_axes(tuple(names), rules)
  out = []
  for dim, axis in zip(shape, axes):
    group = (axis,) if isinstance(axis, str) else tuple(axis or ())
    size = math.prod(mesh.shape[a] for a in group)
    if group and dim % size:
      key = (what, dim, group)
      if key not in warned:
        warned.add(key)
        logging.warning("%s: dimension %d is not divisible by mesh axes %s (size %d); left unsharded there",
                        what, dim, "x".join(group), size)
      axis = None
    out.append(axis)
  return P(*out)


def shardings_of(boxed_tree, mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of nn.LogicallyPartitioned leaves (abstract or real), unboxed."""
  warned: set = set()
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(
      boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  leaves = []
  for path, leaf in paths_and_leaves[0]:
    what = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = _spec(leaf.names, leaf.value.shape, mesh, rules, what, warned)
    else:
      spec = P()
    leaves.append(NamedSharding(mesh, spec))
  return jax.tree_util.tree_unflatten(paths_and_leaves[1], leaves)


def batch_sharding(mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
  """Rows over (data, fsdp), after `leading` unsharded axes (e.g. the grad-accumulation axis)."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES, *([None] * (ndim - leading - 1))))


def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) as a global array in `sharding`; multi-host safe."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place_local(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from each process's rows of it (the data pipeline's share)."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def in_mesh(mesh, jitted):
  """`jitted`, traced, lowered (`.lower`) and run under `mesh` and the logical-axis rules.

  The model's activation constraints take effect only there, and the splash
  kernel's `shard_map` needs the mesh in context.
  """

  def under(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
      with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        return fn(*args, **kwargs)

    return call

  call = under(jitted)
  call.lower = under(jitted.lower)
  return call
