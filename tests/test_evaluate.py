"""The lm-eval backend against lm-eval's own Hugging Face backend (HFLM) on the same weights."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from anita_jax.apps import commands
from anita_jax.infer import evaluate as E
from anita_jax.infer.generate import SamplingSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# |ours - HFLM| <= ATOL + RTOL * |HFLM| per sample: absolute for short continuations, relative
# for paragraph-long sums (fp32 rounding grows with the number of summed terms).
ATOL, RTOL = 1e-4, 1e-5

MC_DOCS = [
    ("Qual è la capitale d'Italia?", ["Roma", "Milano", "Napoli", "Torino"], 0),
    ("Quanti giorni ha una settimana?", ["cinque", "sette", "dieci", "dodici"], 1),
    ("Di che colore è il cielo in una giornata serena?", ["verde", "rosso", "azzurro", "nero"], 2),
    ("Quale animale abbaia?", ["il gatto", "il pesce", "l'uccello", "il cane"], 3),
    ("Qual è il fiume più lungo d'Italia?", ["il Po", "il Tevere", "l'Arno", "l'Adige"], 0),
    ("Chi ha scritto la Divina Commedia?", ["Petrarca", "Dante Alighieri", "Boccaccio", "Manzoni"], 1),
    ("Quante ore ci sono in un giorno?", ["dodici", "venti", "ventiquattro", "trenta"], 2),
    ("In quale stagione cade la neve più spesso?", ["estate", "primavera", "autunno", "inverno"], 3),
    ("Quale città è famosa per i canali e le gondole?", ["Venezia", "Bologna", "Firenze", "Bari"], 0),
    ("Qual è il contrario di caldo?", ["alto", "freddo", "lungo", "veloce"], 1),
]
PARAGRAPHS = [
    "L'Italia è una repubblica parlamentare situata nell'Europa meridionale. Il suo territorio "
    "comprende la penisola italiana, la Sicilia, la Sardegna e numerose isole minori.",
    "La pizza margherita fu creata a Napoli, secondo la tradizione in onore della regina Margherita. "
    "I suoi colori, rosso, bianco e verde, ricordano quelli della bandiera italiana.",
    "Dante Alighieri è considerato il padre della lingua italiana. La Divina Commedia, scritta "
    "all'inizio del Trecento, racconta un viaggio immaginario attraverso Inferno, Purgatorio e Paradiso.",
    "Le Alpi separano l'Italia dal resto del continente. In inverno le loro cime sono coperte di neve "
    "e attirano sciatori da tutto il mondo, mentre d'estate sono meta di escursionisti.",
    "Il caffè espresso è una parte importante della vita quotidiana degli italiani: si beve in piedi "
    "al bancone del bar, spesso a metà mattina, insieme a una breve chiacchierata.",
]
GEN_DOCS = [
    ("Completa la frase. La capitale della Francia è", "Parigi"),
    ("Traduci in inglese: gatto", "cat"),
    ("Scrivi il numero che viene dopo il tre:", "quattro"),
    ("Il colore del latte è", "bianco"),
]


def write_tasks(directory):
  """Three local tasks (JSONL data, lm-eval YAML): multiple choice, perplexity, generation."""
  os.makedirs(directory, exist_ok=True)

  def jsonl(name, rows):
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path

  mc = jsonl("mc.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in MC_DOCS])
  ppl = jsonl("ppl.jsonl", [{"text": t} for t in PARAGRAPHS])
  gen = jsonl("gen.jsonl", [{"question": q, "answer": a} for q, a in GEN_DOCS])
  header = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
  tasks = {
      "mc_it": (mc, "output_type: multiple_choice\n"
                    "doc_to_text: \"Domanda: {{question}}\\nRisposta:\"\n"
                    "doc_to_choice: \"{{choices}}\"\n"
                    "doc_to_target: \"{{answer}}\"\n"
                    "metric_list:\n"
                    "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                    "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"),
      "ppl_it": (ppl, "output_type: loglikelihood_rolling\n"
                      "doc_to_text: \"\"\n"
                      "doc_to_target: \"{{text}}\"\n"
                      "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                      "  - metric: bits_per_byte\n"),
      "gen_it": (gen, "output_type: generate_until\n"
                      "doc_to_text: \"{{question}}\"\n"
                      "doc_to_target: \"{{answer}}\"\n"
                      "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n  do_sample: false\n"
                      "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"),
  }
  for name, (data, body) in tasks.items():
    with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
      f.write(f"task: test_{name}\n" + header.format(data) + body)
  return directory


TASKS = ["test_mc_it", "test_ppl_it", "test_gen_it"]
MAX_LENGTH = 48  # paragraphs are ~60 tokens: every document takes two rolling windows
BATCH = 8


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return write_tasks(str(tmp_path_factory.mktemp("tasks")))


@pytest.fixture(scope="module")
def hflm(smollm2_hf_dir, tmp_path_factory):
  """lm-eval's HF backend on the same local weights, fp32."""
  from lm_eval.models.huggingface import HFLM
  # The fixture's config.json still names the GGUF it came from (quantization_config), which
  # HFLM forwards to from_pretrained; the weights themselves are plain fp32 safetensors.
  clean = str(tmp_path_factory.mktemp("smollm2_hf_clean"))
  for name in os.listdir(smollm2_hf_dir):
    if name != "config.json":
      os.symlink(os.path.join(smollm2_hf_dir, name), os.path.join(clean, name))
  with open(os.path.join(smollm2_hf_dir, "config.json")) as f:
    config = json.load(f)
  config.pop("quantization_config", None)
  with open(os.path.join(clean, "config.json"), "w") as f:
    json.dump(config, f)
  return HFLM(pretrained=clean, dtype="float32", batch_size=BATCH, device="cpu", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def ours(smollm2_hf_dir):
  return commands.load_lm(smollm2_hf_dir, dtype="float32", batch_size=BATCH, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def runs(ours, hflm, task_dir):
  """(our JSON document, lm-eval's output for HFLM) on the three tasks."""
  from unittest import mock

  import lm_eval
  manager = E.task_manager(task_dir, include_defaults=False)
  mine = E.run_tasks(ours, TASKS, manager, bootstrap_iters=0)
  with mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None):
    ref = lm_eval.simple_evaluate(model=hflm, tasks=TASKS, task_manager=manager, bootstrap_iters=0,
                                  log_samples=True)
  return mine, ref


def assert_close(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert np.all(np.abs(ours - ref) <= ATOL + RTOL * np.abs(ref)), np.max(np.abs(ours - ref))


def test_multiple_choice_matches_hflm(runs):
  mine, ref = runs
  for metric in ("acc,none", "acc_norm,none"):
    assert mine["results"]["test_mc_it"][metric] == ref["results"]["test_mc_it"][metric]
  assert mine["n-shot"] == {k: v for k, v in ref["n-shot"].items() if k in mine["n-shot"]}
  assert mine["configs"]["test_mc_it"]["output_type"] == "multiple_choice"
  ours_rows, ref_rows = mine["samples"]["test_mc_it"], ref["samples"]["test_mc_it"]
  assert [r["doc_id"] for r in ours_rows] == [r["doc_id"] for r in ref_rows] == list(range(len(MC_DOCS)))
  for a, b in zip(ours_rows, ref_rows):
    assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
    assert_close([ll for ll, _ in a["filtered_resps"]], [ll for ll, _ in b["filtered_resps"]])
    assert [g for _, g in a["filtered_resps"]] == [g for _, g in b["filtered_resps"]]
    # The recorded per-request values are exactly what lm-eval scored.
    assert [r["loglikelihood"] for r in a["loglikelihoods"]] == [ll for ll, _ in a["filtered_resps"]]
    assert all(r["num_tokens"] >= 1 for r in a["loglikelihoods"])


def test_rolling_perplexity_matches_hflm(runs):
  mine, ref = runs
  ours_metrics, ref_metrics = mine["results"]["test_ppl_it"], ref["results"]["test_ppl_it"]
  # Perplexities are exp(-mean log-likelihood per word or byte): compare that mean, |diff| <= 1e-4.
  for metric in ("word_perplexity,none", "byte_perplexity,none"):
    assert abs(np.log(ours_metrics[metric]) - np.log(ref_metrics[metric])) <= 1e-4, metric
  assert abs(ours_metrics["bits_per_byte,none"] - ref_metrics["bits_per_byte,none"]) <= 1e-4
  for a, b in zip(mine["samples"]["test_ppl_it"], ref["samples"]["test_ppl_it"], strict=True):
    assert_close(a["filtered_resps"], b["filtered_resps"])
    (record,) = a["loglikelihoods"]
    assert record["num_windows"] == 2
    assert record["loglikelihood"] == a["filtered_resps"][0]


def test_generate_until_matches_hflm_greedy(runs):
  mine, ref = runs
  ours_text = [r["filtered_resps"] for r in mine["samples"]["test_gen_it"]]
  ref_text = [r["filtered_resps"] for r in ref["samples"]["test_gen_it"]]
  assert ours_text == ref_text
  assert any(t[0].strip() for t in ours_text)
  assert mine["results"]["test_gen_it"]["exact_match,none"] == ref["results"]["test_gen_it"]["exact_match,none"]


def test_requests_tokenize_and_score_as_hflm(ours, hflm):
  """Empty context, a trailing space, a chat-templated context (starts with BOS), a greedy
  continuation, one-token choices sharing a context, and a request longer than max_length."""
  from lm_eval.api.instance import Instance
  base = "Domanda: Qual è la capitale d'Italia?\nRisposta:"
  greedy = ours.tok_decode(ours.generator().generate_ids([ours.tok_encode(base)], SamplingSpec(max_new_tokens=3))[0])
  chat = [{"role": "user", "content": "Qual è la capitale d'Italia?"}]
  assert ours.apply_chat_template(chat) == hflm.apply_chat_template(chat)
  assert ours.chat_template(True) == hflm.chat_template(True)
  templated = ours.apply_chat_template(chat)
  long_context = " ".join(PARAGRAPHS)  # > MAX_LENGTH tokens: left-truncated
  pairs = [("", "Roma è la capitale d'Italia."), (base + " ", "Roma"), (base, greedy), (templated, "Roma"),
           (base, " A"), (base, " B"), (base, " C"), (long_context, " Fine.")]
  requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
  ref = hflm.loglikelihood(requests, disable_tqdm=True)
  mine = ours.loglikelihood(requests, disable_tqdm=True)
  assert ours.prefix_token_id == hflm.prefix_token_id and ours.eot_token_id == hflm.eot_token_id
  for context, continuation in pairs:
    assert ours.tok_encode(context + continuation) == hflm.tok_encode(context + continuation)
    if context:
      assert ours._encode_pair(context, continuation) == hflm._encode_pair(context, continuation)  # noqa: SLF001
  assert_close([ll for ll, _ in mine], [ll for ll, _ in ref])
  assert [g for _, g in mine] == [g for _, g in ref]
  assert mine[2][1], "the model's own greedy continuation must count as greedy"
  rolling = [Instance("loglikelihood_rolling", {}, (p,), i) for i, p in enumerate(PARAGRAPHS[:2])]
  assert_close(ours.loglikelihood_rolling(rolling, disable_tqdm=True),
               hflm.loglikelihood_rolling(rolling, disable_tqdm=True))


def run_script(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), *args],
                        capture_output=True, text=True, env=env, timeout=900)


def test_script_writes_results_and_samples(smollm2_hf_dir, task_dir, runs, tmp_path):
  out = tmp_path / "eval.json"
  result = run_script(f"--model={smollm2_hf_dir}", "--tasks=test_mc_it", f"--include_path={task_dir}",
                      "--limit=3", f"--max_length={MAX_LENGTH}", "--bootstrap_iters=0", f"--output={out}")
  assert result.returncode == 0, result.stderr
  doc = json.loads(out.read_text())
  assert set(doc) >= {"results", "configs", "n-shot", "samples"}
  assert doc["results"]["test_mc_it"]["sample_len"] == 3
  assert "acc_norm,none" in doc["results"]["test_mc_it"]
  _, ref = runs
  for a, b in zip(doc["samples"]["test_mc_it"], ref["samples"]["test_mc_it"][:3], strict=True):
    assert_close([r["loglikelihood"] for r in a["loglikelihoods"]], [ll for ll, _ in b["filtered_resps"]])
  assert not list(tmp_path.glob("*.tmp*"))


def test_script_unknown_task_is_one_error_line(task_dir, tmp_path):
  result = run_script("--model=/nonexistent", "--tasks=test_mc_it,no_such_task_it", f"--include_path={task_dir}",
                      f"--output={tmp_path / 'x.json'}")
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "no_such_task_it" in lines[0], result.stderr
  assert not (tmp_path / "x.json").exists()


def test_script_task_whose_hub_dataset_cannot_be_fetched_is_one_error_line(tmp_path):
  # lm-eval's own arc_it reads alexandrainst/m_arc (config it) from the hub; offline, datasets refuses at once.
  import lm_eval
  yaml = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "okapi", "arc_multilingual", "arc_it.yaml")
  with open(yaml, encoding="utf-8") as f:
    assert "dataset_path: alexandrainst/m_arc\ndataset_name: it\n" in f.read()
  # --model=/nonexistent: the datasets are fetched before any model is loaded
  result = run_script("--model=/nonexistent", "--tasks=arc_it", f"--output={tmp_path / 'x.json'}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("error: --tasks: task 'arc_it' needs the dataset 'alexandrainst/m_arc' (config 'it') "
                             "from the Hugging Face Hub, which could not be fetched ("), lines[0]
  assert lines[0].endswith("in a directory passed with --include_path"), lines[0]
  assert not (tmp_path / "x.json").exists()


def test_datasets_that_cannot_be_loaded_name_the_task_and_the_dataset(task_dir, tmp_path):
  """In-process, over local task YAMLs only: a hub dataset while offline (tests/conftest.py sets HF_HUB_OFFLINE),
  a local data file that is not there, and a glob that matches both: each one UserError, before any model."""
  from anita_jax.errors import UserError
  directory = tmp_path / "tasks"
  directory.mkdir()
  body = "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
  (directory / "hub.yaml").write_text(f"task: broken_hub\ndataset_path: someone/some_set\n{body}")
  missing = tmp_path / "missing.jsonl"
  (directory / "gone.yaml").write_text(
      f"task: broken_file\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {missing}\n{body}")
  manager = E.task_manager(str(directory), include_defaults=False)
  with pytest.raises(UserError) as e:
    E.load_tasks(["broken_hub"], manager)
  assert str(e.value).startswith("--tasks: task 'broken_hub' needs the dataset 'someone/some_set' from the Hugging "
                                 "Face Hub, which could not be fetched (")
  assert "--include_path" in str(e.value)
  with pytest.raises(UserError, match=rf"^--tasks: task 'broken_file': cannot load its dataset 'json' \(.*"
                                      rf"{missing}.*\)$"):
    E.load_tasks(["broken_file"], manager)
  with pytest.raises(UserError, match="^--tasks: task 'broken_"):
    E.load_tasks(["broken_*"], manager)
  # the good local tasks load, each to lm-eval's own Task of that name
  good = E.load_tasks(["test_mc_*"], E.task_manager(task_dir, include_defaults=False))
  assert [t.task_name for t in good] == ["test_mc_it"] and len(good[0].dataset["test"]) == len(MC_DOCS)
