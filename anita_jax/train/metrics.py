"""Training metrics: `metrics.jsonl`, TensorBoard event files and a progress line on the terminal.

A local workdir's `metrics.jsonl` is appended to. In a gs:// workdir, where objects cannot be appended to,
each logged row is one new object, `metrics.jsonl.d/NNNNNNNN.jsonl` numbered on from the last one
(a resumed run included), so a log writes its own row and never what is there; TensorBoard writes into a
local temporary directory whose event file is uploaded after each flush (whole-object writes: a reader never
sees a cut row). `read_metrics` is the one reader of both layouts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax

from anita_jax import files
from anita_jax.errors import UserError


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _drop_cut_last_line(path: str) -> None:
  """A run killed while writing a row leaves a line without its newline: cut it before appending."""
  try:
    with open(path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)
  except FileNotFoundError:
    pass


FILE = "metrics.jsonl"
PIECES = FILE + ".d"  # a URL workdir's rows, one object per flush


def _pieces(workdir: str) -> list[tuple[int, str]]:
  """(number, name) of the objects under PIECES, in the order they were written."""
  names = [n for n in files.listdir(os.path.join(workdir, PIECES)) if re.fullmatch(r"\d+\.jsonl", n)]
  return sorted((int(n.split(".")[0]), n) for n in names)


def read_metrics(workdir: str) -> list[dict]:
  """The rows a stage logged in `workdir` (its metrics.jsonl, then a URL workdir's pieces in order), one per
  step in step order.

  A resumed run logs again the steps after its last checkpoint: the later row of a step wins.
  A last line of metrics.jsonl cut short (a run killed mid-write) is ignored.
  """
  path = os.path.join(workdir, FILE)
  sources = [path] if files.isfile(path) else []
  sources += [os.path.join(workdir, PIECES, name) for _, name in _pieces(workdir)]
  if not sources:
    raise UserError(f"{path}: no such file (the stage logged no step)")
  by_step: dict[int, dict] = {}
  for source in sources:
    for number, row in files.read_jsonl(source, skip_cut_last_line=source == path):
      if not isinstance(row.get("step"), int):
        raise UserError(f"{source}:{number}: field 'step' is missing or not an integer")
      by_step[row["step"]] = row
  return [by_step[s] for s in sorted(by_step)]


class MetricsWriter:
  """Appends one JSON object per logged step; only process 0 writes."""

  def __init__(self, workdir: str, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._start = time.time()
    self._start_step = None
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    path = os.path.join(workdir, FILE)
    self._remote = files.is_remote(path)
    self._tb_remote = self._tb_local = self._jsonl = None
    if self._remote:
      self._pieces = os.path.join(workdir, PIECES)
      self._next = max((n for n, _ in _pieces(workdir)), default=0) + 1
      self._tb_remote, self._tb_local = os.path.join(workdir, "tensorboard"), tempfile.mkdtemp(prefix="anita-tb-")
      self._tb = SummaryWriter(self._tb_local)
    else:
      _drop_cut_last_line(path)
      self._jsonl = open(path, "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    if self._remote:
      files.write_text(os.path.join(self._pieces, f"{self._next:08d}.jsonl"), json.dumps(row) + "\n")
      self._next += 1
    else:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._remote:
      for name in os.listdir(self._tb_local):
        files.atomic_write(os.path.join(self._tb_remote, name),
                           lambda tmp, name=name: shutil.copyfile(os.path.join(self._tb_local, name), tmp))

  def progress(self, step: int, metrics: dict) -> None:
    """One line on stderr: step, loss, lr, tokens/s, ETA."""
    if not self.enabled:
      return
    if self._start_step is None:
      self._start_step, self._start = step - 1, time.time()
    done = step - self._start_step
    eta = (time.time() - self._start) / max(done, 1) * (self.total_steps - step)
    parts = [f"step {step}/{self.total_steps}"]
    for key, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("learning_rate", ".2e"), ("grad_norm", ".3f"),
                     ("rewards/accuracies", ".2f"), ("rewards/margins", ".3f"), ("tokens_per_second", ".0f")):
      if key in metrics:
        parts.append(f"{key.replace('tokens_per_second', 'tok/s')} {metrics[key]:{fmt}}")
    parts.append(f"ETA {_duration(eta)}")
    print("  ".join(parts), file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      self._tb.close()
      if self._tb_local:
        shutil.rmtree(self._tb_local, ignore_errors=True)
