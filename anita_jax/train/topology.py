"""Cloud TPU chips and topologies for ahead-of-time compilation: peak figures, compile-only devices,
meshes over them, and a model's architecture without the network (presets for known hub ids)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax

from anita_jax.convert import loading
from anita_jax.errors import UserError
from anita_jax.model import sharding as S
from anita_jax.model.config import PRESETS, ModelConfig


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
