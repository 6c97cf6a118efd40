"""What a workdir's checkpoints tie a resumed run to: the config and the data that decide every step.

A re-run in a workdir with checkpoints continues their optimization, so it must see the batches and compute
the function the first run would have: every config field counts, the objective's and the data's included,
except the few in `RESUMABLE`, which change how long the run is, what it reports, where it runs or how a
kernel computes the same function. A longer (or shorter) `train.steps` is how a finished run is extended.

The data sources count by content (`rows.fingerprint` of the rows loaded, recorded in `FINGERPRINTS` at each
start): the same rows under another path, a copy on gs://, resume; a file edited in place does not.
"""

from __future__ import annotations

import json
import os

from anita_jax import files
from anita_jax.data import rows as D
from anita_jax.errors import UserError
from anita_jax.train import config as C
from anita_jax.train import data as TD

# Fields (or whole groups) a resumed run may change.
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.eval_on_start", "train.on_nonfinite",
             "checkpoint", "mesh", "generation", "model.license", "model.remat", "model.attention")
SOURCES = ("data.train", "data.eval")  # compared by content where the workdir recorded it
FINGERPRINTS = "data_fingerprint.json"


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _resumable(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in RESUMABLE)


def data_fingerprints(c: C.StageConfig) -> dict[str, str]:
  """{'data.train': sha256, 'data.eval': sha256 (when set)} of the rows the stage trains and evaluates on."""
  return fingerprints_of({source: TD.load_source(c, source) for source in ("train", "eval")
                          if getattr(c.data, source)})


def fingerprints_of(sources: dict[str, list]) -> dict[str, str]:
  """`data_fingerprints` of rows already loaded ({'train': rows, 'eval': rows}, as `train.data.load_source`)."""
  return {f"data.{source}": D.fingerprint(rows) for source, rows in sources.items()}


def _read_json(path: str):
  return json.loads(files.read_bytes(path)) if files.isfile(path) else None


def check(c: C.StageConfig, workdir: str, fingerprints: dict[str, str]) -> None:
  """Raises UserError naming the first field (or data source) a resumed run changed; nothing to check in a
  workdir without checkpoints."""
  path = os.path.join(workdir, "config.json")
  if not files.isfile(path) or not files.isdir(os.path.join(workdir, "checkpoints")):
    return
  saved = _read_json(os.path.join(workdir, FINGERPRINTS))
  old, new, defaults = _flat(json.loads(files.read_bytes(path))), _flat(C.to_dict(c)), _flat(C.to_dict(C.StageConfig()))
  for field, value in new.items():
    # A field the workdir's config predates had its default's effect.
    before = old.get(field, defaults[field])
    if _resumable(field) or (saved is not None and field in SOURCES and bool(before) == bool(value)):
      continue
    if before != value:
      raise UserError(f"{path}: this workdir was trained with {field}={before!r}, not {value!r}; use a new "
                      "--workdir or the original setting")
  for field in SOURCES if saved is not None else ():
    if saved.get(field) != fingerprints.get(field):
      raise UserError(f"{os.path.join(workdir, FINGERPRINTS)}: this workdir was trained on other {field} rows: the "
                      f"content of {new[field]} changed (sha256 {str(saved.get(field))[:16]}..., now "
                      f"{str(fingerprints.get(field))[:16]}...); use a new --workdir or the original data")


def record(c: C.StageConfig, workdir: str, fingerprints: dict[str, str]) -> None:
  """Writes WORKDIR/config.json and the data fingerprints, what `check` compares a later run with."""
  files.write_json(os.path.join(workdir, "config.json"), C.to_dict(c))
  files.write_json(os.path.join(workdir, FINGERPRINTS), fingerprints)
