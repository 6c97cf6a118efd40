"""The recipe's report: each model's held-out numbers and answers, and the stages' training curves.

scripts/anita.py evaluates the base model (as the stages see it: the first stage's quantization and
compute dtype; the first stage's workdir with its adapter off, on the base that stage imported) and each
stage's workdir with `evaluate_model`,
turns each result into a row with `report_row` (the base result is the reference of every row) and
writes `report.json`, `report.md` and `training_curves.png` with `write_report`.

Definitions (report.md repeats them):
- perplexity: exp(total NLL / total target tokens) over the held-out Italian texts (token-weighted
  over the whole set, fp32 log-probs). Each text is encoded as the `lm` stage encodes text
  (`encode.text_ids`: [BOS] TEXT end-of-turn end-of-text; the first token is not a target), one text
  per row, truncated to max_length.
- preference accuracy: the fraction of held-out pairs with
  log p(chosen) - log p_base(chosen) > log p(rejected) - log p_base(rejected), strict (a tie does not
  count); log p is the summed log-prob of the completion tokens (as DPO scores them) and p_base the
  base model before SFT, in the first stage's quantization and dtype (the frozen weights every stage
  trains on; NF4 in both recipes).
- margin: the mean over pairs of beta * [(log p(c) - log p_base(c)) - (log p(r) - log p_base(r))]
  with the dpo stage's beta: DPO's implicit reward margin, in the units of the dpo stage's `rewards/margins`
  curve (TRL's definition), so the two can be compared.
For the base model itself every log-ratio is 0: its accuracy and margin are 0 by definition, and
`logp_accuracy` (the fraction of pairs with log p(chosen) > log p(rejected), no reference) says how
the model ranks the pairs on its own.

Shapes: B rows, T length, V vocab.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np

from anita_jax import files
from anita_jax.data import batching
from anita_jax.data import encode
from anita_jax.data import rows as data
from anita_jax.convert import loading
from anita_jax.model import losses
from anita_jax.data import preference
from anita_jax.infer import generate as G
from anita_jax.infer import score
from anita_jax.errors import UserError
from anita_jax.train import workdir as W
from anita_jax.train.metrics import read_metrics  # noqa: F401 - the curves' rows; the recipe reads them here

TEXTS_FILE, PAIRS_FILE, PROMPTS_FILE = "it_eval.jsonl", "dpo_eval.jsonl", "prompts.jsonl"
STAGE_TITLES = {"sft": "SFT", "dpo": "DPO", "lm": "Italian LM"}
TABLE_HEADER = "| model | held-out Italian perplexity | preference accuracy | mean margin |"


# ----------------------------------------------------------------------------------------------
# Numbers of one model


@functools.partial(jax.jit, static_argnames=("model",))
def _nll_terms(model, params, batch):
  """(sum of target-token NLL, target count) of one [B, T] batch, fp32."""
  logp_bt, _ = score.token_stats(model, params, batch)
  return losses.nll_terms(logp_bt, batch)


@functools.partial(jax.jit, static_argnames=("model",))
def _completion_logps(model, params, batch):
  """Summed log-probs of each row's loss_mask tokens [B], fp32."""
  return losses.completion_stats(*score.token_stats(model, params, batch), batch["loss_mask"])[0]


def _pad_id(tokenizer) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def perplexity(model, params, tokenizer, texts_path: str, *, max_length: int = 256, batch_size: int = 8,
               max_rows: int | None = None) -> float:
  """exp(total NLL / total target tokens) of the `text` rows of `texts_path` (see the module doc).

  Every batch has the shape [batch_size, longest text] (batch_size cut to the number of rows), so the
  model compiles once; the last batch is filled with empty rows (loss_mask 0).
  """
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size} must be at least 1")
  rows = data.load_rows(texts_path, fmt="text", max_rows=max_rows)
  examples, _ = encode.encode_dataset(rows, tokenizer, max_length=max_length, fmt="text")
  length = max(len(ex.input_ids) for ex in examples)
  batch_size = min(batch_size, len(examples))  # fewer rows than a batch: no all-padding rows to compute
  total_nll, total_tokens = 0.0, 0.0
  for start in range(0, len(examples), batch_size):
    groups = [[i] for i in range(start, min(start + batch_size, len(examples)))]
    groups += [[] for _ in range(batch_size - len(groups))]
    sum_nll, count = _nll_terms(model, params, batching.build_batch(examples, groups, length, _pad_id(tokenizer)))
    total_nll += float(sum_nll)
    total_tokens += float(count)
  return math.exp(total_nll / total_tokens)


def sequence_logps_of_pairs(model, params, tokenizer, pairs_path: str, *, max_length: int = 256,
                            batch_size: int = 4, max_prompt_length: int | None = None,
                            max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(chosen logps [N], rejected logps [N]), float64 arrays of fp32 values, in file order.

  Each is the summed log-prob of the completion tokens of a held-out pair, encoded as the dpo
  stage encodes it (`preference.encode_preferences`); a pair that encoding drops (prompt of
  max_length tokens or more) is left out. Batches are [2 * batch_size, longest pair]: chosen rows
  first, then rejected ones, the last batch filled with empty rows.
  """
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size} must be at least 1")
  rows = data.load_rows(pairs_path, fmt="preference", max_rows=max_rows)
  examples, stats = preference.encode_preferences(rows, tokenizer, max_length=max_length,
                                                  max_prompt_length=max_prompt_length)
  if stats.dropped:
    print(f"{pairs_path}: {stats.dropped} of {stats.rows} pairs dropped (prompt longer than max_length="
          f"{max_length})", file=sys.stderr, flush=True)
  length = max(len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids)) for ex in examples)
  batch_size = min(batch_size, len(examples))
  pad = _pad_id(tokenizer)
  chosen, rejected = [], []
  for start in range(0, len(examples), batch_size):
    pairs = list(range(start, min(start + batch_size, len(examples))))
    n = len(pairs)
    built = preference.build_batch(examples, pairs, 0, 2 * n, length, pad)
    batch = {k: np.full((2 * batch_size, length), pad if k == "input_ids" else 0, np.int32) for k in built}
    for k, v in built.items():
      batch[k][:n], batch[k][batch_size:batch_size + n] = v[:n], v[n:]
    logps_b = np.asarray(_completion_logps(model, params, batch), np.float64)
    chosen.append(logps_b[:n])
    rejected.append(logps_b[batch_size:batch_size + n])
  return np.concatenate(chosen), np.concatenate(rejected)


def preference_metrics(policy: tuple[Sequence[float], Sequence[float]],
                       base: tuple[Sequence[float], Sequence[float]], *, beta: float) -> dict[str, float]:
  """{"accuracy", "margin"} of the implicit reward of `policy` against `base` (see the module doc).

  policy, base: (chosen logps [N], rejected logps [N]) of the same pairs.
  accuracy: fraction of pairs whose chosen log-ratio is strictly above the rejected one.
  margin: beta * mean(chosen log-ratio - rejected log-ratio), float64.
  """
  pc, pr, bc, br = (np.asarray(x, np.float64) for x in (*policy, *base))
  if not pc.shape == pr.shape == bc.shape == br.shape or pc.ndim != 1 or pc.size == 0:
    raise ValueError(f"expected four equal non-empty [N] arrays, got shapes {pc.shape}, {pr.shape}, {bc.shape}, "
                     f"{br.shape} (policy chosen, policy rejected, base chosen, base rejected)")
  chosen_ratio, rejected_ratio = pc - bc, pr - br
  return {"accuracy": float(np.mean(chosen_ratio > rejected_ratio)),
          "margin": float(beta * np.mean(chosen_ratio - rejected_ratio))}


def answers(model, params, tokenizer, config, prompts_path: str, *, max_new_tokens: int = 64,
            batch_size: int = 8, max_rows: int | None = None) -> list[dict]:
  """[{"prompt", "answer"}] per row of a prompts file ({"prompt", "system"?}), greedy, chat template."""
  rows = G.read_prompts_file(prompts_path)[:max_rows]
  generator = G.Generator(model, params, tokenizer, loading.stop_token_ids(tokenizer, config),
                          config.max_position_embeddings, batch_size=batch_size)
  ids = generator.generate_ids([generator.encode(r["prompt"], r.get("system")) for r in rows],
                               G.SamplingSpec(max_new_tokens=max_new_tokens, temperature=0.0))
  return [{"prompt": r["prompt"], "answer": tokenizer.decode(x, skip_special_tokens=True)}
          for r, x in zip(rows, ids)]


def evaluate_model(path: str, data_dir: str, *, dtype: str | None = None, quant=None, adapters: bool = True,
                   max_length: int = 256, max_prompt_length: int | None = None, max_new_tokens: int = 64,
                   texts: str = TEXTS_FILE, pairs: str = PAIRS_FILE, prompts: str = PROMPTS_FILE,
                   max_rows: int | None = None) -> dict:
  """{"perplexity", "chosen_logps", "rejected_logps", "answers"} of a model PATH.

  path: any model PATH (a training workdir runs with its own dtype and quantization unless
    `dtype` / `quant` say otherwise; anything else defaults to float32 and no quantization).
  adapters: False runs a workdir without its own trained adapter (`workdir.load_model`).
  data_dir: holds `texts` (Italian text rows), `pairs` (preference rows) and `prompts`.
  max_rows: at most this many rows of each (None: all).
  """
  what = path if adapters else f"{path} without its adapter"
  print(f"report: evaluating {what} (perplexity, preference pairs, answers)", file=sys.stderr, flush=True)
  paths = [os.path.join(data_dir, name) for name in (texts, pairs, prompts)]
  for path_ in paths:
    if not os.path.isfile(path_):
      raise UserError(f"{path_}: no such file (the report's held-out data)")
  model, params, tokenizer, config = W.load_model(W.model_path(path), dtype=dtype, quant=quant,
                                                scan_layers=None, adapters=adapters)  # loading.decode_scan
  ppl = perplexity(model, params, tokenizer, paths[0], max_length=max_length, max_rows=max_rows)
  chosen, rejected = sequence_logps_of_pairs(model, params, tokenizer, paths[1], max_length=max_length,
                                             max_prompt_length=max_prompt_length, max_rows=max_rows)
  replies = answers(model, params, tokenizer, config, paths[2], max_new_tokens=max_new_tokens, max_rows=max_rows)
  print(f"report: {what}: perplexity {ppl:.3f}, {len(chosen)} pairs, {len(replies)} answers",
        file=sys.stderr, flush=True)
  return {"perplexity": ppl, "chosen_logps": chosen, "rejected_logps": rejected, "answers": replies}


def report_row(name: str, result: dict, base_result: dict, *, beta: float) -> dict:
  """One row of `write_report` from `evaluate_model` results of a model and of the base."""
  logps = (result["chosen_logps"], result["rejected_logps"])
  metrics = preference_metrics(logps, (base_result["chosen_logps"], base_result["rejected_logps"]), beta=beta)
  return {"model": name, "perplexity": float(result["perplexity"]), **metrics,
          "logp_accuracy": float(np.mean(np.asarray(logps[0]) > np.asarray(logps[1]))),
          "answers": list(result["answers"])}


# ----------------------------------------------------------------------------------------------
# Training curves


def _number(value) -> float | None:
  """A finite float, else None (JSON has no NaN)."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def summarize_curve(rows: Sequence[dict]) -> dict:
  """First / last / min of the loss, first / last eval loss, last DPO reward statistics."""
  out: dict = {"logged_points": len(rows)}
  if not rows:
    return out
  trained = [r for r in rows if "loss" in r]  # a step-0 row (train.eval_on_start) holds only eval metrics
  losses_ = [_number(r["loss"]) for r in trained]
  finite = [x for x in losses_ if x is not None]
  out.update(first_step=rows[0]["step"], last_step=rows[-1]["step"],
             first_loss=losses_[0] if losses_ else None, last_loss=losses_[-1] if losses_ else None,
             min_loss=min(finite) if finite else None)
  evals = [r for r in rows if "eval_loss" in r]
  if evals:
    out.update(first_eval_loss=_number(evals[0]["eval_loss"]), last_eval_loss=_number(evals[-1]["eval_loss"]),
               last_eval_step=evals[-1]["step"])
  for key in ("rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins"):
    present = [r for r in rows if key in r]
    if present:
      out[f"last_{key}"] = _number(present[-1][key])
  return out


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  points = [(r["step"], _number(r[key])) for r in rows if key in r]
  return [s for s, _ in points], [np.nan if v is None else v for _, v in points]


def plot_curves(curves: dict[str, list[dict]]):
  """A matplotlib Figure (Agg canvas): one panel per stage, loss and eval loss over steps; for dpo
  the reward accuracy on a secondary axis."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  stages = list(curves) or ["(none)"]
  fig = Figure(figsize=(5.2 * len(stages), 4.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(stages), squeeze=False)[0]
  for ax, stage in zip(axes, stages):
    rows = curves.get(stage, [])
    ax.set_title(f"{STAGE_TITLES.get(stage, stage)} stage" if stage in curves else "no training stages")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if not rows:
      ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
      continue
    ax.plot(*_series(rows, "loss"), color="tab:blue", label="train loss")
    steps, values = _series(rows, "eval_loss")
    if steps:
      ax.plot(steps, values, "o", color="tab:orange", label="eval loss")
    handles, labels = ax.get_legend_handles_labels()
    if any("rewards/accuracies" in r or "eval_rewards/accuracies" in r for r in rows):
      twin = ax.twinx()
      twin.set_ylabel("reward accuracy")
      twin.set_ylim(-0.02, 1.02)
      steps, values = _series(rows, "rewards/accuracies")
      if steps:
        twin.plot(steps, values, "--", color="tab:green", alpha=0.8, label="train reward accuracy")
      steps, values = _series(rows, "eval_rewards/accuracies")
      if steps:
        twin.plot(steps, values, "s", color="tab:red", label="eval reward accuracy")
      more_handles, more_labels = twin.get_legend_handles_labels()
      handles, labels = handles + more_handles, labels + more_labels
    # Below the panel: a legend inside it would cover the curves, and the twin axis would draw over it.
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small",
              frameon=False)
  fig.suptitle("Training curves")
  return fig


# ----------------------------------------------------------------------------------------------
# Writing


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return _number(value)
  return value


def _check_rows(rows: Sequence[dict]) -> list[dict]:
  out = []
  for i, row in enumerate(rows):
    for key in ("model", "perplexity", "accuracy", "margin", "answers"):
      if key not in row:
        raise ValueError(f"report row {i}: key '{key}' is missing (expected model, perplexity, accuracy, margin, "
                         "answers)")
    out.append(dict(row))
  return out


def definitions(beta: float) -> dict[str, str]:
  return {
      "perplexity": "exp(total NLL / total target tokens) over the held-out Italian texts, token-weighted over "
                    "the whole set; each text encoded as the lm stage encodes it ([BOS] text end-of-turn "
                    "end-of-text, the first token not a target).",
      "accuracy": "fraction of held-out preference pairs with log p(chosen) - log p_base(chosen) > "
                  "log p(rejected) - log p_base(rejected) (strict: ties do not count); log p = summed "
                  "log-prob of the completion tokens, p_base = the base model before SFT, in the first stage's "
                  "quantization and dtype.",
      "margin": f"mean over the pairs of beta * [(log p(chosen) - log p_base(chosen)) - (log p(rejected) - "
                f"log p_base(rejected))] with beta = {beta:g}: DPO's implicit reward margin, in the units of "
                "the dpo stage's rewards/margins.",
      "logp_accuracy": "fraction of pairs with log p(chosen) > log p(rejected), without a reference model.",
      "base": "for the base model every log-ratio is 0, so its accuracy and margin are 0 by definition.",
  }


def _fmt(value, spec: str) -> str:
  value = _number(value)
  return "n/a" if value is None else format(value, spec)


def _cell(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: Sequence[dict], summaries: dict[str, dict], beta: float,
                    run: Sequence[str] = ()) -> str:
  with_logp = all("logp_accuracy" in r for r in rows)
  header = TABLE_HEADER + (" log p(chosen) > log p(rejected) |" if with_logp else "")
  lines = ["# ANITA recipe report", "", header, "|---|---:|---:|---:|" + ("---:|" if with_logp else "")]
  for r in rows:
    cells = [_cell(r["model"]), _fmt(r["perplexity"], ".3f"), _fmt(r["accuracy"], ".3f"), _fmt(r["margin"], "+.4f")]
    if with_logp:
      cells.append(_fmt(r["logp_accuracy"], ".3f"))
    lines.append("| " + " | ".join(cells) + " |")
  prompts = next((r["answers"] for r in rows if r.get("answers")), [])
  if prompts:
    lines += ["", "## Answers to the fixed prompts", "", "Greedy decoding with the chat template."]
  for i, item in enumerate(prompts):
    lines += ["", f"### {i + 1}. {item['prompt']}"]
    for r in rows:
      replies = r.get("answers") or []
      answer = replies[i]["answer"].strip() if i < len(replies) else None
      lines += ["", f"**{r['model']}**", ""]
      if answer:
        lines += [f"> {line}" if line.strip() else ">" for line in answer.splitlines()]
      else:
        lines.append("> *(no answer)*" if answer is None else "> *(empty)*")
  if summaries:
    lines += ["", "## Training curves", "", "![training curves](training_curves.png)", "",
              "| stage | logged steps | loss, first -> last | eval loss, first -> last | last reward accuracy (train / eval) |",
              "|---|---:|---:|---:|---:|"]
    for stage, s in summaries.items():
      acc = ""
      if "last_rewards/accuracies" in s or "last_eval_rewards/accuracies" in s:
        acc = (f"{_fmt(s.get('last_rewards/accuracies'), '.3f')} / "
               f"{_fmt(s.get('last_eval_rewards/accuracies'), '.3f')}")
      steps = f"{s['logged_points']} (to step {s['last_step']})" if s["logged_points"] else "0"
      lines.append(f"| {_cell(stage)} | {steps} | {_fmt(s.get('first_loss'), '.4f')} -> "
                   f"{_fmt(s.get('last_loss'), '.4f')} | {_fmt(s.get('first_eval_loss'), '.4f')} -> "
                   f"{_fmt(s.get('last_eval_loss'), '.4f')} | {acc or 'n/a'} |")
  chains = [(r["model"], r["chain"]) for r in rows if r.get("chain")]
  if chains:
    lines += ["", "## How each stage started", ""] + [f"- **{_cell(name)}**: {text}" for name, text in chains]
  if run:
    lines += ["", "## Run the exported model", "", "```"] + list(run) + ["```"]
  d = definitions(beta)
  lines += ["", "## How the numbers are defined", "",
            f"- **held-out Italian perplexity**: {d['perplexity']}",
            f"- **preference accuracy**: {d['accuracy']}",
            f"- **mean margin**: {d['margin']}"]
  if with_logp:
    lines.append(f"- **log p(chosen) > log p(rejected)**: {d['logp_accuracy']}")
  lines += [f"- {d['base'][0].upper()}{d['base'][1:]}", ""]
  return "\n".join(lines)


def write_report(out_dir: str, rows: Sequence[dict], curves: dict[str, list[dict]], *,
                 beta: float, run: Sequence[str] = ()) -> None:
  """Writes `report.json`, `report.md` and `training_curves.png` into `out_dir`, each atomically.

  rows: one per model, in order (base, sft, dpo, lm): {"model", "perplexity", "accuracy", "margin",
    "answers": [{"prompt", "answer"}], ...}; further keys (e.g. `logp_accuracy`) go into report.json.
  curves: stage -> its `read_metrics` rows.
  beta: the one `preference_metrics` used, for the definitions written beside the numbers.
  run: shell commands that run the exported model (a section of report.md).
  """
  rows = _check_rows(rows)
  files.makedirs(out_dir)
  summaries = {stage: summarize_curve(r) for stage, r in curves.items()}
  report = {"models": _jsonable(rows), "curves": _jsonable(summaries), "definitions": definitions(beta)}
  files.write_json(os.path.join(out_dir, "report.json"), report, sort_keys=False, ensure_ascii=False)
  files.write_text(os.path.join(out_dir, "report.md"), render_markdown(rows, summaries, beta, run))
  fig = plot_curves(curves)
  files.atomic_write(os.path.join(out_dir, "training_curves.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
