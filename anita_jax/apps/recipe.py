"""The whole ANITA recipe: SFT -> DPO -> Italian LM, each stage from the one before (`init_as`), then the
exports (`DIR/hf`: merged model + PEFT adapter; `DIR/gguf`: llama.cpp files + Ollama Modelfile) and the report.

Each stage is an ordinary training workdir under DIR (`DIR/sft`, `DIR/dpo`, `DIR/lm`);
a finished stage leaves `DONE.json` and is skipped when the recipe runs again, and an
unfinished one resumes from its latest checkpoint. Finished exports are kept.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import jax
import ml_collections

from anita_jax import files
from anita_jax.apps import report
from anita_jax.convert import gguf_export
from anita_jax.model import quant as Q
from anita_jax.train import loop as train
from anita_jax.train import publish
from anita_jax.train import state as ST
from anita_jax.train.config import STAGES
from anita_jax.train import workdir as W
from anita_jax.errors import UserError

DEMO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_data")


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _phase(title: str):
  """Announces a phase of the recipe and its wall time when it ends."""
  _say(f"== {title}")
  started = time.time()
  yield
  _say(f"== {title.split(' ->')[0]}: {time.time() - started:.1f} s")


def _done_path(stage_dir: str) -> str:
  return os.path.join(stage_dir, "DONE.json")


def run_stage(c: ml_collections.ConfigDict, stage_dir: str) -> None:
  """Trains (or resumes) the stage and marks it finished."""
  started = time.time()
  metrics = train.train_and_evaluate(c, stage_dir)
  if jax.process_index() == 0:
    files.write_json(_done_path(stage_dir), {"seconds": round(time.time() - started, 1), "last_metrics": metrics})


def run_recipe(recipe: ml_collections.ConfigDict, workdir: str) -> None:
  """scripts/anita.py: the three stages, the merged export in DIR/hf, and DIR/report.{json,md} + plot.

  One base cache for the whole run: the stages, exports and report models import the shared base once."""
  with ST.BaseCache():
    _run_recipe(recipe, workdir)


def _run_recipe(recipe: ml_collections.ConfigDict, workdir: str) -> None:
  missing = [s for s in STAGES if s not in recipe]
  if missing:
    raise UserError(f"--config: a recipe config needs the stages {', '.join(STAGES)}; '{missing[0]}' is missing "
                    "(give a recipe config without an ARG)")
  ggufs = gguf_files(recipe, workdir)
  files.makedirs(workdir)
  previous, trained = None, False
  for name in STAGES:
    c = recipe[name]
    if previous is not None:
      c.init_from = previous
    stage_dir = os.path.join(workdir, name)
    if files.isfile(_done_path(stage_dir)):
      _say(f"== stage {name}: finished earlier, skipped ({stage_dir})")
    else:
      with _phase(f"stage {name} -> {stage_dir}"):
        run_stage(c, stage_dir)
      trained = True
    previous = stage_dir
  last = recipe[STAGES[-1]]
  hf_dir = os.path.join(workdir, "hf")
  needs_hf = not files.isfile(os.path.join(hf_dir, "config.json"))
  if needs_hf:
    with _phase(f"export -> {hf_dir}"):
      publish.export_hf(previous, hf_dir, dtype=last.model.dtype)
  missing = {t: f for t, f in ggufs.items() if not files.isfile(f)}
  if missing:
    first = next(iter(ggufs))
    with _phase(f"gguf -> {', '.join(missing.values())}"):
      publish.export_gguf(previous, missing, modelfile_for=first if first in missing else None, progress=True)
  if not (trained or needs_hf or missing) and files.isfile(os.path.join(workdir, "report.md")):
    _say(f"== report: {os.path.join(workdir, 'report.md')} is up to date (no stage ran), skipped")
    return
  with _phase("report"):
    write_recipe_report(recipe, workdir, run_commands(ggufs, workdir))


def gguf_files(recipe: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """type -> DIR/gguf/model-TYPE.gguf for the recipe's `export.gguf` (a comma list; f16 when the config has
  no export group; empty: none). Checked before any stage runs."""
  types = files.split_list(recipe.export.gguf) if "export" in recipe else ["f16"]
  for type_ in types:
    try:
      gguf_export.check_type(type_)
    except UserError as e:
      raise UserError(f"config field 'export.gguf'={recipe.export.gguf!r}: {e}") from None
  return {t: os.path.join(workdir, "gguf", f"model-{t}.gguf") for t in types}


def run_commands(ggufs: dict[str, str], workdir: str) -> list[str]:
  """How to run the exports, for the report."""
  lines = [f"python scripts/generate.py --model={os.path.join(workdir, 'hf')} --prompt='Ciao! Chi sei?'"]
  if ggufs:
    first = next(iter(ggufs.values()))
    lines += [f"llama-cli -m {first} -cnv   # llama.cpp",
              f"ollama create anita -f {os.path.join(os.path.dirname(first), 'Modelfile')} && ollama run anita"]
  return lines


def _chain(c: ml_collections.ConfigDict, earlier: tuple[str, ...]) -> str:
  """How a stage's frozen weights came about (init_as), for the report."""
  quant = "unquantized" if c.quant.type == "none" else c.quant.type.upper()
  if not earlier:
    return f"the base model ({quant}) + a new LoRA adapter"
  if c.init_as == "stacked":
    return (f"the first stage's base ({quant}), the adapters of {', '.join(earlier)} kept frozen "
            "(init_as=stacked) + a new LoRA adapter")
  return (f"the merged model of {earlier[-1]} (merge_into={c.merge_into}), re-quantized ({quant}; "
          "init_as=merged) + a new LoRA adapter")


def write_recipe_report(recipe: ml_collections.ConfigDict, workdir: str, run: list[str] = ()) -> None:
  """Evaluates the base (in the first stage's quantization and dtype) and every stage on the held-out data;
  writes the report files."""
  data_dir = DEMO_DATA  # the project's held-out Italian text, preference pairs and prompts
  first = recipe[STAGES[0]]
  dpo = recipe["dpo"]
  settings = recipe.get("report") or {}
  kwargs = dict(max_length=dpo.data.max_length, max_prompt_length=dpo.data.max_prompt_length,
                max_new_tokens=settings.get("max_new_tokens", 64), max_rows=settings.get("max_rows") or None)
  # The base as the stages see it: the first stage's quantization and compute dtype (an 8B base in full
  # precision would need 32 GB, more than a v5e chip or a 24 GiB host holds). When that stage trained only
  # its adapter, that is its workdir with the adapter off, on the base the stage rows reuse (one import).
  if files.split_list(first.train.trainable) == ["lora"]:
    base = report.evaluate_model(os.path.join(workdir, STAGES[0]), data_dir, adapters=False, **kwargs)
  else:
    quant = Q.QuantSpec(first.quant.type, first.quant.block_size, first.quant.double_quant)
    base = report.evaluate_model(W.model_path(first.model.path), data_dir, dtype=first.model.dtype, quant=quant,
                                 **kwargs)
  rows = [report.report_row("base", base, base, beta=dpo.dpo.beta)]
  for i, name in enumerate(STAGES):
    result = report.evaluate_model(os.path.join(workdir, name), data_dir, **kwargs)
    row = report.report_row(name, result, base, beta=dpo.dpo.beta)
    row["chain"] = _chain(recipe[name], STAGES[:i])
    rows.append(row)
  curves = {name: report.read_metrics(os.path.join(workdir, name)) for name in STAGES}
  if jax.process_index() == 0:
    report.write_report(workdir, rows, curves, beta=dpo.dpo.beta, run=run)
