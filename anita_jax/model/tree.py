"""Parameter trees as flat paths: flatten, split into trainable and frozen, combine; the trainable groups.

A quantized kernel (`quant.NF4Weight`, `quant.Int4Weight`) is one leaf here, kept whole: paths end at the
weight's name, never inside its 4-bit fields.
"""

from __future__ import annotations

from flax import traverse_util

from anita_jax.errors import UserError

LORA_LEAVES = ("lora_a", "lora_b")  # the trainable LoRA factors of a projection (`model.lora`)
# What `train.trainable` may name besides the adapters.
TRAINABLE_GROUPS = {
    "lora": lambda path: path[-1] in LORA_LEAVES,
    "embed_tokens": lambda path: path[0] == "embed_tokens",
    "lm_head": lambda path: path[0] == "lm_head",
    "norms": lambda path: path[-1] == "scale",
}


def trainable_mask(params: dict, groups=("lora",)) -> dict:
  """A bool tree over `params`: True for the leaves of the named groups (see TRAINABLE_GROUPS)."""
  unknown = [g for g in groups if g not in TRAINABLE_GROUPS]
  if unknown:
    raise UserError(f"train.trainable: unknown group '{unknown[0]}' (choose from {', '.join(TRAINABLE_GROUPS)})")
  flat = traverse_util.flatten_dict(params, is_leaf=is_leaf)
  return traverse_util.unflatten_dict(
      {p: any(TRAINABLE_GROUPS[g](p) for g in groups) for p in flat})


def is_leaf(_, node) -> bool:
  return not isinstance(node, dict)  # quantized nodes are leaves of the parameter tree here


def flatten(tree: dict) -> dict:
  """{path tuple: weight} with quantized nodes kept whole."""
  return traverse_util.flatten_dict(tree, is_leaf=is_leaf)


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat)


def partition(params: dict, mask: dict) -> tuple[dict, dict]:
  """(trainable, frozen): two disjoint trees whose union is `params`."""
  flat = traverse_util.flatten_dict(params, is_leaf=is_leaf)
  keep = traverse_util.flatten_dict(mask)
  trainable = {p: v for p, v in flat.items() if keep[p]}
  frozen = {p: v for p, v in flat.items() if not keep[p]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(*trees: dict) -> dict:
  """The union of disjoint parameter trees (the inverse of `partition`)."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree, is_leaf=is_leaf))
  return traverse_util.unflatten_dict(flat)
