"""The report's numbers against transformers' LlamaForCausalLM (torch) on the same weights, and its files."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from anita_jax.convert import loading
from anita_jax.apps import report as R

TEXTS = [
    "Il Po è il fiume più lungo d'Italia: nasce dal Monviso e sfocia nel mare Adriatico.",
    "Napoli si affaccia sul golfo omonimo, dominato dal Vesuvio.",
    "La polenta è un piatto a base di farina di mais cotta a lungo in acqua salata, tipico "
    "soprattutto dell'Italia settentrionale, e si accompagna a formaggi, funghi o carne in umido.",
]
PAIRS = [
    ("Qual è il plurale di «tasca»?", "Il plurale di «tasca» è «tasche».", "Il plurale di «tasca» è «tasce»."),
    ("Che cos'è la polenta?", "Un piatto di farina di mais cotta in acqua.", "Preferisco non rispondere."),
    ("Qual è il simbolo chimico del fosforo?", "Il simbolo del fosforo è P.", "It is P."),
]
PROMPTS = ["Qual è la capitale d'Italia?", "Scrivi una breve poesia sull'autunno."]


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  return str(path)


def pair_rows():
  return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
           "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]


@pytest.fixture(scope="module")
def jax_model(tiny_hf_dir):
  return loading.load_pretrained(tiny_hf_dir, scan_layers=False)


@pytest.fixture(scope="module")
def torch_model(tiny_hf_dir):
  model = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)


def torch_perplexity(torch_model, texts, max_length):
  """exp(sum NLL / count) over the texts, each as SmolLM2 text: TEXT <|im_end|> <|endoftext|> (no BOS)."""
  model, tokenizer = torch_model
  ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
  total, count = 0.0, 0
  for text in texts:
    ids = (tokenizer(text, add_special_tokens=True)["input_ids"] + ends)[:max_length]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
      loss = model(input_ids=input_ids, labels=input_ids).loss.item()  # mean over the len - 1 targets
    total += loss * (len(ids) - 1)
    count += len(ids) - 1
  return float(np.exp(total / count))


def torch_pair_logps(torch_model):
  """Summed log_softmax of each completion token, prompt = the chat template with a generation prompt."""
  model, tokenizer = torch_model
  chosen, rejected = [], []
  for p, c, r in PAIRS:
    prompt = [{"role": "user", "content": p}]
    prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
    for answer, out in ((c, chosen), (r, rejected)):
      full = list(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}],
                                                tokenize=True, return_dict=True)["input_ids"])
      assert full[:len(prompt_ids)] == prompt_ids
      with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), dim=-1)
      out.append(sum(logp[t - 1, full[t]].item() for t in range(len(prompt_ids), len(full))))
  return np.array(chosen), np.array(rejected)


def torch_greedy(torch_model, prompts, max_new_tokens, stop_ids):
  model, tokenizer = torch_model
  texts = []
  for prompt in prompts:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
    kept = []
    for t in out.tolist():
      if t in stop_ids:
        break
      kept.append(t)
    texts.append(tokenizer.decode(kept, skip_special_tokens=True))
  return texts


@pytest.mark.parametrize("max_length", [256, 20])
def test_perplexity_matches_transformers_token_weighted(jax_model, torch_model, tmp_path, max_length):
  path = write_jsonl(tmp_path / "it.jsonl", [{"text": t} for t in TEXTS])
  model, params, tokenizer, _ = jax_model
  got = R.perplexity(model, params, tokenizer, path, max_length=max_length, batch_size=2)  # last batch padded
  want = torch_perplexity(torch_model, TEXTS, max_length)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_sequence_logps_of_pairs_match_torch(jax_model, torch_model, tmp_path):
  path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
  model, params, tokenizer, _ = jax_model
  chosen, rejected = R.sequence_logps_of_pairs(model, params, tokenizer, path, batch_size=2)
  want_chosen, want_rejected = torch_pair_logps(torch_model)
  assert chosen.shape == rejected.shape == (len(PAIRS),)
  np.testing.assert_allclose(chosen, want_chosen, atol=1e-4, rtol=0)
  np.testing.assert_allclose(rejected, want_rejected, atol=1e-4, rtol=0)


def test_preference_metrics_match_numpy_with_a_tie():
  rng = np.random.default_rng(0)
  pc, pr, bc, br = (rng.normal(-40.0, 5.0, 9) for _ in range(4))
  # Pair 0: both log-ratios are exactly 1.0, a tie that must not count.
  pc[0], bc[0], pr[0], br[0] = -1.0, -2.0, -3.0, -4.0
  got = R.preference_metrics((pc, pr), (bc, br), beta=0.1)
  wins = [float((pc[i] - bc[i]) > (pr[i] - br[i])) for i in range(9)]
  deltas = [0.1 * ((pc[i] - bc[i]) - (pr[i] - br[i])) for i in range(9)]
  assert wins[0] == 0.0
  np.testing.assert_allclose(got["accuracy"], np.mean(wins), rtol=0, atol=1e-15)
  np.testing.assert_allclose(got["margin"], np.mean(deltas), rtol=1e-12)
  assert R.preference_metrics((bc, br), (bc, br), beta=0.1) == {"accuracy": 0.0, "margin": 0.0}
  with pytest.raises(ValueError):
    R.preference_metrics((pc, pr[:3]), (bc, br), beta=0.1)


def test_evaluate_model_matches_transformers(tiny_hf_dir, torch_model, tmp_path):
  write_jsonl(tmp_path / R.TEXTS_FILE, [{"text": t} for t in TEXTS])
  write_jsonl(tmp_path / R.PAIRS_FILE, pair_rows())
  write_jsonl(tmp_path / R.PROMPTS_FILE, [{"prompt": p} for p in PROMPTS])
  result = R.evaluate_model(tiny_hf_dir, str(tmp_path), max_new_tokens=6)
  assert set(result) == {"perplexity", "chosen_logps", "rejected_logps", "answers"}
  np.testing.assert_allclose(result["perplexity"], torch_perplexity(torch_model, TEXTS, 256), rtol=1e-4)
  want_chosen, want_rejected = torch_pair_logps(torch_model)
  np.testing.assert_allclose(result["chosen_logps"], want_chosen, atol=1e-4, rtol=0)
  np.testing.assert_allclose(result["rejected_logps"], want_rejected, atol=1e-4, rtol=0)
  _, _, tokenizer, config = loading.load_pretrained(tiny_hf_dir, scan_layers=False)
  want = torch_greedy(torch_model, PROMPTS, 6, set(loading.stop_token_ids(tokenizer, config)))
  assert result["answers"] == [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, want)]
  row = R.report_row("sft", result, result, beta=0.1)
  assert (row["accuracy"], row["margin"]) == (0.0, 0.0)
  assert row["logp_accuracy"] == np.mean(want_chosen > want_rejected)


def test_evaluate_model_names_a_missing_file(tiny_hf_dir, tmp_path):
  with pytest.raises(R.UserError, match=R.TEXTS_FILE):
    R.evaluate_model(tiny_hf_dir, str(tmp_path))


def test_read_metrics_keeps_the_last_row_of_a_step_and_skips_a_cut_last_line(tmp_path):
  lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.4, "eval_loss": 2.6},
           {"step": 3, "loss": 2.0}]
  with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
  assert R.read_metrics(str(tmp_path)) == [lines[0], lines[2], lines[3]]
  with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as f:
    f.write('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(R.UserError, match=r"metrics.jsonl:2"):
    R.read_metrics(str(tmp_path))
  with pytest.raises(R.UserError, match="no such file"):
    R.read_metrics(str(tmp_path / "missing"))


def fake_curves():
  rng = np.random.default_rng(1)

  def stage(steps, start, dpo=False):
    rows = []
    for s in range(1, steps + 1):
      row = {"step": s, "loss": start * np.exp(-s / steps) + 0.05 * rng.random(), "learning_rate": 1e-4,
             "grad_norm": 1.0, "tokens_per_second": 500.0}
      if s % 10 == 0 or s == steps:
        row["eval_loss"] = row["loss"] + 0.1
      if dpo:
        row.update({"rewards/accuracies": min(1.0, s / steps + 0.2 * rng.random()), "rewards/margins": s / steps,
                    "rewards/chosen": 0.1, "rewards/rejected": -0.1})
        if "eval_loss" in row:
          row["eval_rewards/accuracies"] = min(1.0, s / steps)
      rows.append(row)
    return rows

  return {"sft": stage(60, 2.5), "dpo": stage(60, 0.69, dpo=True), "lm": stage(40, 2.0)}


def test_write_report_writes_the_three_files(tmp_path):
  answers = [{"prompt": p, "answer": f"risposta {i}\nseconda riga"} for i, p in enumerate(PROMPTS)]
  rows = [{"model": name, "perplexity": 20.0 - i, "accuracy": 0.25 * i, "margin": 0.1 * i,
           "logp_accuracy": 0.5, "answers": answers} for i, name in enumerate(("base", "sft", "dpo", "lm"))]
  out = tmp_path / "run"
  R.write_report(str(out), rows, fake_curves(), beta=0.1)
  assert sorted(os.listdir(out)) == ["report.json", "report.md", "training_curves.png"]  # no temporary left
  with Image.open(out / "training_curves.png") as image:
    image.verify()
  with Image.open(out / "training_curves.png") as image:
    assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
  md = (out / "report.md").read_text(encoding="utf-8")
  assert "| model | held-out Italian perplexity | preference accuracy | mean margin |" in md
  for i, name in enumerate(("base", "sft", "dpo", "lm")):
    assert f"| {name} | {20.0 - i:.3f} | {0.25 * i:.3f} |" in md
  for p in PROMPTS:
    assert p in md
  report = json.loads((out / "report.json").read_text(encoding="utf-8"))
  assert [m["model"] for m in report["models"]] == ["base", "sft", "dpo", "lm"]
  assert report["models"][2]["accuracy"] == 0.5 and report["models"][0]["answers"] == answers
  assert report["curves"]["dpo"]["last_step"] == 60 and "last_rewards/accuracies" in report["curves"]["dpo"]
  assert report["curves"]["sft"]["last_eval_loss"] is not None
  # A second write replaces the first; a malformed row raises before anything is written.
  R.write_report(str(out), rows[:1], {}, beta=0.1)
  assert json.loads((out / "report.json").read_text(encoding="utf-8"))["curves"] == {}
  with pytest.raises(ValueError, match="margin"):
    R.write_report(str(out), [{"model": "x", "perplexity": 1.0, "accuracy": 0.0, "answers": []}], {}, beta=0.1)
