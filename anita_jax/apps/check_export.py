"""Does a merged export compute what its training workdir computes? `scripts/check_export.py`.

The workdir's model (its base in the stage's own quantization, every adapter on: `workdir.load_model`) and
the merged export in transformers score the same chat prompt in the same dtype, and the logits of every
position are compared. Ours runs first, in a child process, so that all of its memory is back before
transformers loads the export: at 8B each side holds several GB.

What to expect: in float32 the two agree to about 1e-6 of the largest logit (the export is the workdir's
dequantized base plus its adapters, merged in float32). In bfloat16 both sides round differently (ours
adds each adapter's product to the dequantized projection's, the export rounds the merged weight once), so
expect a relative difference of a few 1e-2 and argmax agreement at most positions.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile

import numpy as np

from anita_jax import files
from anita_jax.convert import loading
from anita_jax.errors import UserError
from anita_jax.train import workdir as W

DEFAULT_PROMPT = "Ciao! Chi sei? Rispondi in italiano."


def chat_ids(export: str, prompt: str) -> list[int]:
  """The export's tokenizer and chat template applied to one user turn, with the generation prompt."""
  tokenizer = loading.load_tokenizer(export)
  ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
  return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def our_logits(workdir: str, ids: list[int], dtype: str) -> np.ndarray:
  """float32 logits [T, V] of the workdir's model computed in `dtype`."""
  net, params, _, _ = W.load_model(workdir, dtype=dtype, scan_layers=None)
  return np.asarray(net.apply({"params": params}, np.asarray([ids], np.int32))[0][0], np.float32)


def _save_our_logits(out: str, workdir: str, ids: list[int], dtype: str) -> None:
  np.save(out, our_logits(workdir, ids, dtype), allow_pickle=False)


def our_logits_apart(workdir: str, ids: list[int], dtype: str) -> np.ndarray:
  """`our_logits` computed in a child process (its memory all returned when it exits)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "logits.npy")
    child = multiprocessing.get_context("spawn").Process(target=_save_our_logits, args=(out, workdir, ids, dtype))
    child.start()
    child.join()
    if child.exitcode != 0:
      raise UserError(f"--workdir={workdir}: computing the workdir's logits failed (exit code {child.exitcode})")
    return np.load(out, allow_pickle=False)


def their_logits(export: str, ids: list[int], dtype: str) -> np.ndarray:
  """float32 logits [T, V] of the merged export in transformers, computed in `dtype`."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=getattr(torch, dtype)).eval()
  with torch.no_grad():
    return model(torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()


def compare(workdir: str, export: str, *, dtype: str = "float32", prompt: str = DEFAULT_PROMPT) -> dict:
  """{"tokens", "dtype", "max_abs_logit", "max_abs_diff", "relative", "argmax_agreement"}: the export's
  logits in transformers against the workdir's, `relative` = max |difference| / max |logit| (ours)."""
  if not W.is_workdir(workdir):
    raise UserError(f"--workdir={workdir}: not a training workdir (no config.json and checkpoints/)")
  if files.is_remote(export):
    export = files.local_copy(export)
  ids = chat_ids(export, prompt)
  print(f"check_export: {len(ids)} tokens; the workdir's model in {dtype}", file=sys.stderr, flush=True)
  ours = our_logits_apart(workdir, ids, dtype)
  print(f"check_export: {export} in transformers, {dtype}", file=sys.stderr, flush=True)
  theirs = their_logits(export, ids, dtype)
  if theirs.shape != ours.shape:
    raise UserError(f"--export={export}: logits of shape {theirs.shape}, the workdir's are {ours.shape}")
  diff = float(np.max(np.abs(theirs.astype(np.float64) - ours)))
  scale = float(np.max(np.abs(ours)))
  return {"tokens": len(ids), "dtype": dtype, "max_abs_logit": scale, "max_abs_diff": diff,
          "relative": diff / scale, "argmax_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}
