"""Training metrics: `metrics.jsonl`, TensorBoard event files and a progress line on the terminal.

In a gs:// workdir, where objects cannot be appended to, `metrics.jsonl` is rewritten whole at each
logged step and TensorBoard writes into a local temporary directory whose event file is uploaded after
each flush (whole-object writes: a reader never sees a cut row).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import time

import jax

from anita_jax import files


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
    path = os.path.join(workdir, "metrics.jsonl")
    self._remote = path if files.is_remote(path) else None
    self._tb_remote = self._tb_local = None
    if self._remote:
      old = files.read_bytes(path) if files.isfile(path) else b""
      self._jsonl = io.StringIO(old[:old.rfind(b"\n") + 1].decode("utf-8"))
      self._jsonl.seek(0, io.SEEK_END)
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
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._remote:
      files.write_text(self._remote, self._jsonl.getvalue())
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
      self._jsonl.close()
      self._tb.close()
      if self._tb_local:
        shutil.rmtree(self._tb_local, ignore_errors=True)
