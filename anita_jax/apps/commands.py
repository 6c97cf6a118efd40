"""What the scripts run: generation, lm-eval, the data preview and the export check, for any model PATH.

scripts/generate.py -> `generate`, scripts/evaluate.py -> `evaluate`, scripts/preview_data.py -> `preview`,
scripts/check_export.py -> `check_export`. A model PATH is an HF directory, a .gguf file, a hub id, a PEFT
adapter directory or a training workdir (`workdir.load_model`).

The export check: the workdir's model (its base in the stage's own quantization, every adapter on) and the
merged export in transformers score the same chat prompt in the same dtype, and the logits of every position
are compared. Ours runs first, in a child process, so that all of its memory is back before transformers loads
the export: at 8B each side holds several GB. In float32 the two agree to about 1e-6 of the largest logit (the
export is the workdir's dequantized base plus its adapters, merged in float32). In bfloat16 both sides round
differently (ours adds each adapter's product to the dequantized projection's, the export rounds the merged
weight once), so expect a relative difference of a few 1e-2 and argmax agreement at most positions.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Sequence

import jax
import numpy as np

from anita_jax import files
from anita_jax.convert import generation, loading
from anita_jax.data import rows as D
from anita_jax.errors import UserError
from anita_jax.infer import generate as G
from anita_jax.train import config as C
from anita_jax.train import objectives as OBJ
from anita_jax.train import workdir as W


def _default_dtype(path: str, dtype: str | None) -> str | None:
  """The --dtype given, else a workdir's own (None), else float32 on the CPU and bfloat16 on accelerators."""
  if dtype is None and not W.is_workdir(path):
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return dtype


# Generation ------------------------------------------------------------------------------------


def generate(*, model, prompt, prompts_file, system, chat, max_new_tokens, temperature, top_p, top_k, seed,
             dtype, quant, batch_size) -> None:
  """scripts/generate.py: prints the generated text, or one JSON line per row of a prompts file."""
  if (prompt is None) == (prompts_file is None):
    raise UserError("give exactly one of --prompt and --prompts_file")
  if prompt is not None and not prompt.strip():
    raise UserError("--prompt is empty")
  rows = G.read_prompts_file(prompts_file) if prompts_file else [{"prompt": prompt, "system": system}]
  path = model or loading.embedded_default_path()
  dtype = _default_dtype(path, dtype)
  # Unrolled layers for a dense model, scanned for a quantized one (loading.decode_scan).
  net, params, tokenizer, config = W.load_model(path, dtype=dtype, quant=quant, scan_layers=None)
  sampling = sampling_spec(path, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
  generator = G.Generator(net, params, tokenizer, loading.stop_token_ids(tokenizer, config),
                        config.max_position_embeddings, batch_size=batch_size)
  ids = generator.generate_ids(
      [generator.encode(r["prompt"], r.get("system") or system, chat) for r in rows], sampling, seed)
  texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
  if prompts_file is None:
    print(texts[0])
  else:
    for row, text in zip(rows, texts):
      print(json.dumps({"prompt": row["prompt"], "text": text}, ensure_ascii=False))


def sampling_spec(path: str, **flags) -> G.SamplingSpec:
  """The flags given (not None), the rest from the model PATH's generation config (`W.generation_config`: a
  workdir samples as its export does), SamplingSpec's defaults where neither says."""
  values = {k: v for k, v in generation.sampling(W.generation_config(path)).items() if v is not None}
  values.update({k: v for k, v in flags.items() if v is not None})
  return G.SamplingSpec(**values)


# lm-evaluation-harness -------------------------------------------------------------------------

def load_lm(path: str, *, dtype: str | None = None, quant: str | None = None, scan_layers: bool = True,
            **kwargs):
  """The lm-eval model of a model PATH (see `workdir.load_model`); kwargs go to `JaxLM`.
  dtype/quant None keep a workdir's own (plain models: float32, unquantized)."""
  from anita_jax.infer import evaluate as E  # lm-eval and torch: imported by the commands that use them
  model, params, tokenizer, config = W.load_model(path, dtype=dtype, quant=quant, scan_layers=scan_layers)
  info = {"model_path": path, "dtype": dtype, "quant": quant, "num_params": config.num_params}
  return E.JaxLM(model, params, tokenizer, config, info=info, **kwargs)


def evaluate(*, model: str | None, tasks: Sequence[str], output: str, num_fewshot: int | None = None,
             limit: int | None = None, include_path: str | None = None, batch_size: int = 8,
             apply_chat_template: bool = False, system: str | None = None, dtype: str | None = None,
             quant: str | None = None, max_length: int | None = None, bootstrap_iters: int = 100000) -> dict:
  """scripts/evaluate.py: check the tasks, load the model, run lm-eval, write `output`."""
  from lm_eval.utils import make_table

  from anita_jax.infer import evaluate as E

  if not output:
    raise UserError("--output: required (FILE.json)")
  directory = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(directory):  # checked before the run, not after it
    raise UserError(f"--output={output}: directory {directory} does not exist")
  if limit is not None and limit < 1:
    raise UserError(f"--limit={limit}: must be at least 1")
  manager = E.task_manager(include_path)
  tasks = E.load_tasks(E.check_tasks(tasks, manager), manager)  # datasets before the model: fails fast
  path = model or loading.embedded_default_path()
  dtype = _default_dtype(path, dtype)
  lm = load_lm(path, dtype=dtype, quant=quant, batch_size=batch_size, max_length=max_length)
  doc = E.run_tasks(lm, tasks, manager, num_fewshot=num_fewshot, limit=limit,
                    apply_chat_template=apply_chat_template, system=system, bootstrap_iters=bootstrap_iters)
  files.write_json(output, doc, sort_keys=False, ensure_ascii=False)
  print(make_table(doc))
  return doc


# The data preview ------------------------------------------------------------------------------

def preview(c, num_examples: int) -> None:
  """scripts/preview_data.py: the first examples of data.train as the trainer encodes them, as JSON lines."""
  c = C.freeze(c)
  C.validate(c)
  tokenizer = loading.load_tokenizer(c.model.tokenizer or W.model_path(c.model.path))
  rows = D.load_rows(files.split_list(c.data.train), split=c.data.split, config_name=c.data.config_name,
                     fmt=c.data.format,
                     max_rows=num_examples if c.data.max_rows is None else min(num_examples, c.data.max_rows))
  examples, stats = OBJ.objective(c.stage).encode(c, rows, tokenizer)
  # Packed DPO pairs: one record per packed row of these examples (its pairs, branches and masks).
  for record in OBJ.objective(c.stage).preview(c, examples[:num_examples], tokenizer):
    print(json.dumps(record, ensure_ascii=False))
  print(f"{stats}", file=sys.stderr)


# The export check ------------------------------------------------------------------------------

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


def check_export(workdir: str, export: str, *, dtype: str = "float32", prompt: str = DEFAULT_PROMPT) -> dict:
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
