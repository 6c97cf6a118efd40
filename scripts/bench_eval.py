"""Log-likelihood requests per second: our lm-eval backend vs lm-eval's HF backend, same run, fp32.

python scripts/bench_eval.py [--model=PATH] [--docs=40] [--batch_size=8]
Writes a local multiple-choice task (generated Italian arithmetic questions, 4 choices each) to a
temporary directory, builds its requests with lm-eval, and times `loglikelihood` on each backend:
a first (cold: compiles) and a second (warm) pass for ours, one pass for HFLM. Prints JSON.
"""

import json
import os
import random
import sys
import tempfile
import time

from absl import flags

from anita_jax.apps import cli

_MODEL = flags.DEFINE_string("model", None, "Model PATH: .gguf file or HF directory (default: embedded SmolLM2).")
_DOCS = flags.DEFINE_integer("docs", 40, "Documents (4 requests each).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size, both backends.")
WORDS = ["mele", "pere", "libri", "sedie", "gatti", "euro", "chilometri", "bottiglie"]


def write_task(directory, n):
  rng = random.Random(0)
  with open(os.path.join(directory, "bench.jsonl"), "w", encoding="utf-8") as f:
    for _ in range(n):
      a, b, w = rng.randint(1, 99), rng.randint(1, 99), rng.choice(WORDS)
      story = " ".join(f"Poi Luca ne compra altre {rng.randint(1, 9)}." for _ in range(rng.randint(0, 12)))
      choices = [str(a + b + d) for d in [0] + rng.sample([1, -1, 10, -10, 2], 3)]
      rng.shuffle(choices)
      row = {"question": f"Marta ha {a} {w} e ne riceve {b}. {story} Quante {w} aveva Marta prima di Luca?",
             "choices": choices, "answer": choices.index(str(a + b))}
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  with open(os.path.join(directory, "bench.yaml"), "w", encoding="utf-8") as f:
    f.write(f"task: bench_mc_it\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {os.path.join(directory, 'bench.jsonl')}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: \"Domanda: {{question}}\\nRisposta:\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main(argv):
  del argv
  import lm_eval.tasks
  import torch
  from lm_eval.models.huggingface import HFLM

  from anita_jax.apps import commands
  from anita_jax.convert import loading
  path = _MODEL.value or loading.embedded_default_path()
  with tempfile.TemporaryDirectory() as directory:
    write_task(directory, _DOCS.value)
    task = lm_eval.tasks.TaskManager(include_path=directory, include_defaults=False).load(
        ["bench_mc_it"])["tasks"]["bench_mc_it"]
    task.build_all_requests()
    requests = list(task.instances)
  n = len(requests)
  ours = commands.load_lm(path, dtype="float32", batch_size=_BATCH.value)
  cold, _ = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
  warm, mine = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
  if os.path.isfile(path):
    kwargs = dict(pretrained=os.path.dirname(path), gguf_file=os.path.basename(path))
  else:
    kwargs = dict(pretrained=path)
  hflm = HFLM(dtype="float32", batch_size=_BATCH.value, device="cpu", **kwargs)
  hf_time, ref = timed(lambda: hflm.loglikelihood(requests, disable_tqdm=True))
  result = {
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "model": path, "requests": n,
      "batch_size": _BATCH.value, "dtype": "float32", "torch_threads": torch.get_num_threads(),
      "anita_jax_requests_per_s": round(n / warm, 2), "anita_jax_cold_requests_per_s": round(n / cold, 2),
      "hflm_requests_per_s": round(n / hf_time, 2), "speedup_warm": round(hf_time / warm, 2),
      "max_abs_loglikelihood_diff": max(abs(a[0] - b[0]) for a, b in zip(mine, ref)),
  }
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  cli.run(main)
