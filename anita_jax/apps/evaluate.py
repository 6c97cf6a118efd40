"""scripts/evaluate.py: lm-evaluation-harness tasks on any model PATH (a training workdir included)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
from lm_eval.utils import make_table

from anita_jax import files
from anita_jax.convert import loading
from anita_jax.errors import UserError
from anita_jax.infer import evaluate as E
from anita_jax.train import workdir as W


def load_lm(path: str, *, dtype: str | None = None, quant: str | None = None, scan_layers: bool = True,
            **kwargs) -> E.JaxLM:
  """The lm-eval model of a model PATH (see `workdir.load_model`); kwargs go to `JaxLM`.
  dtype/quant None keep a workdir's own (plain models: float32, unquantized)."""
  model, params, tokenizer, config = W.load_model(path, dtype=dtype, quant=quant, scan_layers=scan_layers)
  info = {"model_path": path, "dtype": dtype, "quant": quant, "num_params": config.num_params}
  return E.JaxLM(model, params, tokenizer, config, info=info, **kwargs)


def main(*, model: str | None, tasks: Sequence[str], output: str, num_fewshot: int | None = None,
         limit: int | None = None, include_path: str | None = None, batch_size: int = 8,
         apply_chat_template: bool = False, system: str | None = None, dtype: str | None = None,
         quant: str | None = None, max_length: int | None = None, bootstrap_iters: int = 100000) -> dict:
  """scripts/evaluate.py: check the tasks, load the model, run lm-eval, write `output`."""
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
  if dtype is None and not W.is_workdir(path):  # a workdir has its own dtype
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  lm = load_lm(path, dtype=dtype, quant=quant, batch_size=batch_size, max_length=max_length)
  doc = E.run_tasks(lm, tasks, manager, num_fewshot=num_fewshot, limit=limit,
                    apply_chat_template=apply_chat_template, system=system, bootstrap_iters=bootstrap_iters)
  files.write_json(output, doc, sort_keys=False, ensure_ascii=False)
  print(make_table(doc))
  return doc
