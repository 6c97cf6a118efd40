"""Data preparation speed at ANITA scale, with the real Llama-3 tokenizer (Meta-Llama-3-8B-Instruct's).

python scripts/bench_data.py [--sft_rows=100000] [--dpo_pairs=40000] [--seed=0] [--output=FILE.json] [--trl=true]
    [--config=configs/anita_8b.py] [--config.sft.data.max_length=8192 ...]

Each stage's data goes through the training stage's own path, `train.data.build_data` (load_rows from a
JSONL file, the stage objective's encode, its batch iterator's packing), with the recipe's data fields
(configs/anita_8b.py: SFT alpaca rows, all-token loss, packed to 8192 tokens; DPO conversational pairs,
max_length 1024, max_prompt_length 512, data.packing=true: pairs first-fit into rows of 2 x 1024), then every
packed row of epoch 0 is built (`eval_batches`: the arrays the step consumes). Checked on the way: the built
rows hold every encoded token exactly once.

The rows are synthesized (seeded; not timed): Italian-looking words from a Zipf-like vocabulary, word counts
log-normal. SFT (as Chat-Error/wizard_alpaca_dolly_orca): instruction median 20 words, an input in 40% of rows
(median 30), output median 120 words (sigma 1.0). DPO (as mlabonne/orpo-dpo-mix-40k: chosen/rejected message
lists and the prompt string): user turn median 50 words, completions median 85 words (sigma 0.8), 10% with a
system turn, 10% with an earlier exchange.
Throughput: rows (pairs) and tokens (prompt + chosen + rejected for DPO) per second of wall time from the
JSONL file to the built rows; `--train_tokens_per_second_*` (README's v5e-8 estimates) give the ratio of data
preparation to training speed.

A stage's first run encodes in worker processes and saves the examples in its workdir's `prepared/`; a restart
(resume, preemption) reads them back: both are timed, the restart from the JSONL file to its iterator, the
first run also in CPU seconds (this process and its workers: the figure to compare on a busy machine). Beside
them, with --trl, TRL's own preparation of the same rows (as conversations: alpaca rows as their messages,
pairs as prompt / chosen / rejected message lists) with the same tokenizer, max_length and packing:
`SFTTrainer._prepare_dataset` / `DPOTrainer._prepare_dataset` with dataset_num_proc = the usable cores, called
on a trainer of a tiny model (the trainer's own setup is not timed; its CPU seconds count its map workers).
"""

import copy
import json
import math
import os
import tempfile
import time

from absl import flags
from ml_collections import config_flags

from anita_jax.apps import cli

_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "anita_8b.py")
_CONFIG = config_flags.DEFINE_config_file("config", _RECIPE, "A whole recipe (one ConfigDict per stage).",
                                          lock_config=True)
_SFT_ROWS = flags.DEFINE_integer("sft_rows", 100000, "Alpaca rows for the SFT stage (0: skip).")
_DPO_PAIRS = flags.DEFINE_integer("dpo_pairs", 40000, "Conversational preference pairs for the DPO stage (0: skip).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthesized rows.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON to this file.")
_TRL = flags.DEFINE_bool("trl", True, "Also time TRL's preparation of the same rows.")
_SFT_TRAIN = flags.DEFINE_float("train_tokens_per_second_sft", 8 * 2022,
                                "Tokens/s the SFT step consumes (README, v5e:2x4 splash: 2022 per chip x 8).")
_DPO_TRAIN = flags.DEFINE_float("train_tokens_per_second_dpo", 8 * 1570,
                                "Pair tokens/s the packed DPO step consumes (README, packed DPO on v5e:2x4: "
                                "1570 distinct pair tokens/s per chip x 8).")

_FUNCTION_WORDS = ("di e il la che in a per un non è una con del si le da i al come più ma lo della anche sono "
                   "gli nel questo alla se ha essere o delle dei tra cui ci hanno molto quando dove perché").split()


def _vocabulary(rng, size: int = 20000) -> tuple[list[str], "object"]:
  """Italian-looking words (function words first) and Zipf-like probabilities over them."""
  import numpy as np
  onsets = "b c d f g l m n p r s t v z ch gh gl gn sc st tr pr br cr fr gr pi ri".split()
  vowels = "a e i o u a e i o ia io ie".split()
  endings = "zione mente tore trice ento ano ico ità are ere ire ato uto ito oso osa ale ile".split()
  words, seen = list(_FUNCTION_WORDS), set(_FUNCTION_WORDS)
  while len(words) < size:
    syllables = [onsets[i] + vowels[j] for i, j in zip(rng.integers(0, len(onsets), rng.integers(1, 4)),
                                                        rng.integers(0, len(vowels), 4))]
    word = "".join(syllables) + (endings[rng.integers(len(endings))] if rng.random() < 0.4 else "")
    if word not in seen:
      seen.add(word)
      words.append(word)
  p = 1.0 / (np.arange(size) + 8.0)
  return words, p / p.sum()


class _Text:
  """Sentences of Italian-looking words, drawn from one pre-sampled stream of word indices."""

  def __init__(self, rng, total_words: int):
    self.rng = rng
    self.words, p = _vocabulary(rng)
    self.stream = rng.choice(len(self.words), size=total_words + 1, p=p)
    self.pos = 0

  def __call__(self, n: int) -> str:
    n = max(1, n)
    if self.pos + n > len(self.stream):
      self.pos = 0
    idx = self.stream[self.pos:self.pos + n]
    self.pos += n
    out, start = [], 0
    while start < n:
      stop = min(n, start + int(self.rng.integers(6, 25)))
      sentence = [self.words[i] for i in idx[start:stop]]
      sentence[0] = sentence[0].capitalize()
      out.append(" ".join(sentence) + (". " if self.rng.random() < 0.85 else "?\n\n" if stop < n else "?"))
      start = stop
    return "".join(out).strip()


def _lognormal(rng, median: float, sigma: float, size: int, cap: int):
  import numpy as np
  return np.minimum(np.rint(rng.lognormal(math.log(median), sigma, size)), cap).astype(int)


def synth_alpaca(n: int, seed: int) -> list[dict]:
  import numpy as np
  rng = np.random.default_rng([seed, 1])
  instr, out = _lognormal(rng, 20, 0.7, n, 400), _lognormal(rng, 120, 1.0, n, 3000)
  inp = np.where(rng.random(n) < 0.4, _lognormal(rng, 30, 1.0, n, 1500), 0)
  text = _Text(rng, int(instr.sum() + inp.sum() + out.sum()))
  return [{"instruction": text(int(a)), "input": text(int(b)) if b else "", "output": text(int(c))}
          for a, b, c in zip(instr, inp, out)]


def synth_pairs(n: int, seed: int) -> list[dict]:
  import numpy as np
  rng = np.random.default_rng([seed, 2])
  prompt, chosen, rejected = (_lognormal(rng, m, 0.8, n, 1500) for m in (50, 85, 85))
  system, history = rng.random(n) < 0.1, rng.random(n) < 0.1
  text = _Text(rng, int(prompt.sum() + chosen.sum() + rejected.sum()) * 2)
  rows = []
  for i in range(n):
    question = text(int(prompt[i]))
    turns = [{"role": "system", "content": text(30)}] if system[i] else []
    if history[i]:
      turns += [{"role": "user", "content": text(20)}, {"role": "assistant", "content": text(60)}]
    turns.append({"role": "user", "content": question})
    rows.append({"source": "synthetic", "prompt": question,
                 "chosen": turns + [{"role": "assistant", "content": text(int(chosen[i]))}],
                 "rejected": turns + [{"role": "assistant", "content": text(int(rejected[i]))}]})
  return rows


def cpu_seconds() -> float:
  """CPU time of this process and its finished children: what a phase costs on a machine shared with others."""
  import resource
  return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def bench_stage(c, rows: list[dict], tokenizer, directory: str) -> dict:
  """Writes `rows` as JSONL, then times data.train -> built packed rows through the training stage's path: a
  first run (encoding, saving the prepared examples) and a restart (reading them)."""
  import numpy as np

  from anita_jax.train import config as C
  from anita_jax.train import data
  path = os.path.join(directory, f"{c.stage}.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  c = C.replace(C.freeze(c), **{"data.train": path, "data.eval": ""})
  workdir = os.path.join(directory, f"{c.stage}-run")
  start, cpu = time.perf_counter(), cpu_seconds()
  it, stats = data.build_data(c, tokenizer, workdir=workdir)
  encoded, cpu = time.perf_counter(), cpu_seconds() - cpu
  tokens = targets = built = 0
  for batch in it.eval_batches():
    tokens += int(np.count_nonzero(batch["segment_ids"]))
    targets += int(batch["loss_mask"].sum())
    built += int(np.count_nonzero(batch["segment_ids"].any(axis=1)))
  end = time.perf_counter()
  groups = it.groups(0)
  if tokens != stats.tokens or built != len(groups) or sum(map(len, groups)) != stats.kept:
    raise AssertionError(f"{c.stage}: the packed rows hold {tokens} tokens in {built} rows; encoding gave "
                         f"{stats.tokens} tokens, packing {len(groups)} rows")
  restart = time.perf_counter()
  again, again_stats = data.build_data(c, tokenizer, workdir=workdir)
  restarted = time.perf_counter()
  if vars(again_stats) != vars(stats) or again.groups(0) != groups:
    raise AssertionError(f"{c.stage}: the restart read other examples than the first run encoded")
  return {"stage": c.stage, "rows": len(rows), "kept": stats.kept, "truncated": stats.truncated,
          "dropped": stats.dropped, "tokens": tokens, "targets": targets, "packed_rows": built,
          "row_length": it.max_length, "fill": tokens / (built * it.max_length),
          "encode_processes": data.encode_workers(len(rows)), "first_run_seconds": encoded - start,
          "first_run_cpu_seconds": cpu,
          "restart_seconds": restarted - restart, "load_encode_pack_seconds": encoded - start,
          "build_seconds": end - encoded, "wall_seconds": end - start,
          "rows_per_second": len(rows) / (end - start), "tokens_per_second": tokens / (end - start)}


def trl_prepare_seconds(c, rows: list[dict], tokenizer, directory: str) -> tuple[float, float]:
  """(wall, CPU) seconds TRL takes to prepare `rows` (a stage's dataset) as its trainer does, with
  dataset_num_proc = cores."""
  import datasets
  import torch
  import transformers
  import trl

  from anita_jax.data import rows as D
  loaded = [D.Row("bench", i, r, D.detect_format(D.Row("bench", i, r))) for i, r in enumerate(rows, 1)]
  if c.stage == "dpo":
    records = [dict(zip(("prompt", "chosen", "rejected"), D.preference_parts(r)[1:])) for r in loaded]
  else:
    records = [{"messages": D.conversation(r, r.format)} for r in loaded]
  datasets.disable_progress_bars()
  dataset = datasets.Dataset.from_list(records)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=1))
  common = {"output_dir": os.path.join(directory, "trl"), "report_to": [], "use_cpu": True, "save_strategy": "no",
            "max_length": c.data.max_length, "dataset_num_proc": len(os.sched_getaffinity(0))}
  one = dataset.select(range(1))
  if c.stage == "dpo":
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=trl.DPOConfig(**common),
                             train_dataset=one, processing_class=tokenizer)
    prepare = lambda: trainer._prepare_dataset(dataset, tokenizer, trainer.args, "train")  # noqa: E731
  else:
    args = trl.SFTConfig(packing=c.data.packing, **common)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=one, processing_class=tokenizer)
    prepare = lambda: trainer._prepare_dataset(dataset, tokenizer, args, args.packing, None, "train")  # noqa: E731
  start, cpu = time.perf_counter(), cpu_seconds()
  prepare()
  return time.perf_counter() - start, cpu_seconds() - cpu


def main(argv):
  del argv
  from anita_jax.convert import llama3_tokenizer
  recipe = _CONFIG.value
  tokenizer = llama3_tokenizer.load()
  stages = [("sft", _SFT_ROWS.value, synth_alpaca, _SFT_TRAIN.value, "rows"),
            ("dpo", _DPO_PAIRS.value, synth_pairs, _DPO_TRAIN.value, "pairs")]
  results = []
  with tempfile.TemporaryDirectory() as directory:
    for name, n, synth, train_rate, unit in stages:
      if n <= 0:
        continue
      t = time.perf_counter()
      rows = synth(n, _SEED.value)
      print(f"{name}: synthesized {n} {unit} in {time.perf_counter() - t:.1f} s (not timed)", flush=True)
      r = bench_stage(recipe[name], rows, tokenizer, directory)
      r["train_tokens_per_second"] = train_rate
      r["data_over_train"] = r["tokens_per_second"] / train_rate
      if _TRL.value:
        r["trl_prepare_seconds"], r["trl_prepare_cpu_seconds"] = trl_prepare_seconds(recipe[name], rows, tokenizer,
                                                                                      directory)
      results.append(r)
      print(f"{name}: {n} {unit} -> {r['kept']} kept ({r['truncated']} truncated, {r['dropped']} dropped), "
            f"{r['tokens']:,} tokens ({r['tokens'] / max(r['kept'], 1):.0f} a {unit[:-1]}) in {r['packed_rows']:,} "
            f"packed rows of {r['row_length']} ({100 * r['fill']:.1f}% full)", flush=True)
      print(f"{name}: wall {r['wall_seconds']:.1f} s (load + encode + pack {r['load_encode_pack_seconds']:.1f} s, "
            f"build rows {r['build_seconds']:.1f} s): {r['rows_per_second']:,.0f} {unit}/s, "
            f"{r['tokens_per_second']:,.0f} tokens/s = {r['data_over_train']:.1f}x the {train_rate:,.0f} tokens/s "
            "training consumes", flush=True)
      trl_line = (f"; TRL's preparation {r['trl_prepare_seconds']:.1f} s ({r['trl_prepare_cpu_seconds']:.1f} s CPU)"
                  if "trl_prepare_seconds" in r else "")
      procs = f"{r['encode_processes']} process{'es' if r['encode_processes'] > 1 else ''}"
      print(f"{name}: first run (load + encode in {procs} + save + pack) "
            f"{r['first_run_seconds']:.1f} s ({r['first_run_cpu_seconds']:.1f} s CPU), restart (read the prepared "
            f"examples) {r['restart_seconds']:.1f} s{trl_line}", flush=True)
  if _OUTPUT.value:
    from anita_jax import files
    files.write_json(_OUTPUT.value, results)


if __name__ == "__main__":
  cli.run(main)
