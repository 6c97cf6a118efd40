"""lm-evaluation-harness with this project's JAX model as the backend.

`JaxLM` is an `lm_eval.api.model.LM` (through lm-eval's `TemplateLM`, so the
context/continuation split is lm-eval's own `_encode_pair`). It reproduces the
semantics of lm-eval's Hugging Face backend (`HFLM`):

- tokenization: `tok_encode` adds the tokenizer's special tokens unless the text
  already starts with the decoded prefix token (BOS, else EOS), as `HFLM.tok_encode`;
- loglikelihood: input = (context + continuation)[-(max_length + 1):][:-1]; the score is
  the sum of the fp32 log-softmax at the continuation's tokens, `is_greedy` is whether
  the argmax at each of those positions is the continuation token;
- requests whose inputs are identical (context + continuation[:-1]: multiple choice
  with one-token answers) share one forward pass, as HFLM's logits cache;
- loglikelihood_rolling: lm-eval's `get_rolling_token_windows` + `make_disjoint_window`
  with the prefix token and `max_length`;
- generate_until: greedy (or sampled, per gen_kwargs) through `generate.Generator`, the
  context left-truncated to max_length - max_gen_toks, the text cut at the stop strings.

Shapes: B batch (fixed per instance), T bucketed length, C scored positions per row, V vocab.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models import utils as model_utils
from tqdm import tqdm

from anita_jax.infer import generate as G
from anita_jax.infer import score
from anita_jax.errors import UserError

log = logging.getLogger(__name__)
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


@functools.partial(jax.jit, static_argnames=("model", "width"))
def _score_batch(model, params, tokens_bt, segments_bt, end_b, *, width: int):
  """Scores the last `width` positions before each row's end (C = width).

  Returns log p(next token) [B, C] (fp32; the last column is not meaningful), the argmax
  [B, C], and the fp32 log-softmax of the last real position [B, V] (the one position whose
  target differs between requests that share an input).

  The LM head runs only on those C positions (the [B, T, V] logits would be 0.5 GB per row
  at T = 1024 and Llama-3's V = 128256).
  """
  hidden_btd = score.hidden_states(model, params, {"input_ids": tokens_bt, "segment_ids": segments_bt})
  t = tokens_bt.shape[1]
  pos_bc = jnp.clip(end_b[:, None] - width + jnp.arange(width)[None, :], 0, t - 1)
  hidden_bcd = jnp.take_along_axis(hidden_btd, pos_bc[..., None], axis=1)
  logits_bcv = score.head_logits(model, params, hidden_bcd)
  lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
  targets_bc = jnp.take_along_axis(tokens_bt, jnp.clip(pos_bc + 1, 0, t - 1), axis=1)
  target_logp = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0] - lse_bc
  last_logp = logits_bcv[:, -1] - lse_bc[:, -1:]
  return target_logp, jnp.argmax(logits_bcv, axis=-1).astype(jnp.int32), last_logp


class JaxLM(TemplateLM):
  """An lm-eval language model over (Llama module, params, tokenizer, ModelConfig).

  batch_size: rows per compiled forward pass (fixed, so one compile per length bucket).
  max_length: context window in tokens (default: the config's max_position_embeddings).
  add_bos_token / prefix_token_id: as HFLM's arguments of the same names.
  `records` collects one dict per scored request (task, doc_id, index, loglikelihood, ...).
  """

  def __init__(self, model, params, tokenizer, config, *, batch_size: int = 8, max_length: int | None = None,
               add_bos_token: bool | None = None, prefix_token_id: int | None = None, seed: int = 0,
               info: dict | None = None):
    super().__init__()
    if batch_size < 1:
      raise UserError(f"--batch_size={batch_size}: must be at least 1")
    self.model, self.params, self.tokenizer, self.config = model, params, tokenizer, config
    self._batch_size = int(batch_size)
    self._max_length = int(max_length or config.max_position_embeddings)
    self.add_bos_token = add_bos_token
    self.custom_prefix_token_id = prefix_token_id
    self.seed = seed
    self.info = dict(info or {})
    self.records: list[dict] = []
    self.batch_sizes: dict = {}
    self._generator = None

  # --- what lm-eval reads --------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return 256

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  def get_model_info(self) -> dict:
    return dict(self.info)

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    import jinja2
    kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                  continue_final_message=not add_generation_prompt)
    try:
      return self.tokenizer.apply_chat_template(chat_history, **kwargs)
    except jinja2.exceptions.TemplateError:
      # As HFLM: templates that reject a system turn get the history without it.
      log.warning("the chat template failed; retrying without the system message")
      return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    if add_special_tokens is not None:
      special = {"add_special_tokens": add_special_tokens}
    elif self.add_bos_token is not None:
      special = {"add_special_tokens": self.add_bos_token}
    else:
      special = {}  # the tokenizer's own default (Llama 3 adds <|begin_of_text|>, SmolLM2 nothing)
    if add_special_tokens is None and model_utils.has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
      special["add_special_tokens"] = False  # the text already carries its BOS (a chat template's)
    ids = self.tokenizer.encode(string, **special)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  # --- log-likelihood ------------------------------------------------------------------------

  def _encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """TemplateLM.loglikelihood's encoding of one request (empty context: the prefix token)."""
    if context == "":
      cont = self.tok_encode(continuation, add_special_tokens=False)
      return ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
    return self._encode_pair(context, continuation)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [self._encode_request(*req.args) for req in requests]
    scored = self._score(pairs, disable_tqdm=disable_tqdm, desc="loglikelihood")
    for req, (_, cont), (ll, greedy) in zip(requests, pairs, scored):
      self.records.append({"task": getattr(req, "task_name", None), "doc_id": getattr(req, "doc_id", None),
                           "index": getattr(req, "idx", None), "type": "loglikelihood", "loglikelihood": ll,
                           "is_greedy": greedy, "num_tokens": len(cont)})
    return scored

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """lm-eval's token-level entry: requests are (strings, context_enc, continuation_enc)."""
    return self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm=disable_tqdm)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, req in enumerate(requests):
      (string,) = req.args
      tokens = self.tok_encode(string)
      for window in lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                       max_seq_len=self.max_length, context_len=1):
        windows.append(lm_utils.make_disjoint_window(window))
        owner.append(i)
    scored = self._score(windows, disable_tqdm=disable_tqdm, desc="loglikelihood_rolling")
    totals = [0.0] * len(requests)
    counts = collections.Counter(owner)
    predicted = [0] * len(requests)
    for i, (_, cont), (ll, _) in zip(owner, windows, scored):
      totals[i] += ll
      predicted[i] += len(cont)
    for i, req in enumerate(requests):
      self.records.append({"task": getattr(req, "task_name", None), "doc_id": getattr(req, "doc_id", None),
                           "index": getattr(req, "idx", None), "type": "loglikelihood_rolling",
                           "loglikelihood": totals[i], "num_tokens": predicted[i], "num_windows": counts[i]})
    return totals

  def _score(self, pairs: Sequence[tuple[list[int], list[int]]], *, disable_tqdm: bool = False,
             desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), is_greedy) per (context_ids, continuation_ids).

    Longest first, as lm-eval; requests with the same input tokens share one row.
    """
    groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
    for i, (ctx, cont) in enumerate(pairs):
      if not ctx or not cont:
        raise UserError(f"request {i + 1}: empty context or continuation after tokenization")
      if len(cont) > self.max_length:
        raise UserError(f"request {i + 1}: continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
      groups[tuple(ctx + cont[:-1])].append(i)
    keys = sorted(groups, key=lambda k: (-len(k), k))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    b = self.batch_size
    pbar = tqdm(total=len(pairs), desc=desc, unit="req", disable=disable_tqdm)
    start_time, n_tokens = time.perf_counter(), 0
    for start in range(0, len(keys), b):
      chunk = keys[start:start + b]
      inputs = [list(k[-self.max_length:]) for k in chunk]  # = (ctx + cont)[-(max_length + 1):][:-1]
      t = G.bucket(max(len(x) for x in inputs))
      width = min(t, G.bucket(max(len(pairs[i][1]) for k in chunk for i in groups[k])))
      tokens = np.zeros((b, t), np.int32)
      segments = np.zeros((b, t), np.int32)
      ends = np.ones((b,), np.int32)
      for row, inp in enumerate(inputs):
        tokens[row, :len(inp)] = inp
        segments[row, :len(inp)] = 1
        ends[row] = len(inp)
      target_logp, argmax, last_logp = jax.device_get(_score_batch(
          self.model, self.params, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(ends), width=width))
      for row, (key, inp) in enumerate(zip(chunk, inputs)):
        n = len(inp)
        for i in groups[key]:
          cont = pairs[i][1]
          c = len(cont)  # its tokens are the targets of columns width - c .. width - 1
          ll = float(np.sum(target_logp[row, width - c:width - 1], dtype=np.float64) + last_logp[row, cont[-1]])
          greedy = bool(np.all(argmax[row, width - c:] == np.asarray(cont)))
          results[i] = (ll, greedy)
        n_tokens += n
        pbar.update(len(groups[key]))
      pbar.set_postfix(tokens_per_s=f"{n_tokens / (time.perf_counter() - start_time):.0f}", length=t)
    pbar.close()
    return results

  # --- generation ----------------------------------------------------------------------------

  def generator(self) -> G.Generator:
    if self._generator is None:
      from anita_jax.convert import loading
      self._generator = G.Generator(self.model, self.params, self.tokenizer,
                                    loading.stop_token_ids(self.tokenizer, self.config), self.max_length,
                                    batch_size=self.batch_size)
    return self._generator

  def _encode_prompt(self, context: str, max_ctx_len: int) -> list[int]:
    """HFLM.tok_batch_encode for one text: no special tokens when it already starts with BOS."""
    if model_utils.has_bos_prefix(context, self.tokenizer.bos_token):
      kwargs = {"add_special_tokens": False}
    elif self.add_bos_token is not None:
      kwargs = {"add_special_tokens": self.add_bos_token}
    else:
      kwargs = {}
    return self.tokenizer(context, **kwargs)["input_ids"][-max_ctx_len:]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
    by_kwargs: dict[str, list[int]] = collections.defaultdict(list)
    for i, req in enumerate(requests):
      by_kwargs[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
    out: list[str | None] = [None] * len(requests)
    pbar = tqdm(total=len(requests), desc="generate_until", unit="req", disable=disable_tqdm)
    for indices in by_kwargs.values():
      task = getattr(requests[indices[0]], "task_name", None) or "generate_until"
      raw = requests[indices[0]].args[1]
      unknown = sorted(set(raw) - set(GEN_KWARGS) - {"max_new_tokens", "max_tokens", "max_completion_tokens"}
                       - ({"num_beams"} if raw.get("num_beams", 1) == 1 else set()))
      if unknown:
        raise UserError(f"{task}: generation_kwargs {', '.join(unknown)} not supported by this backend")
      kwargs = model_utils.normalize_gen_kwargs(raw, self.max_gen_toks)
      until = model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      max_gen = kwargs.pop("max_gen_toks")
      if max_gen >= self.max_length:
        raise UserError(f"{task}: max_gen_toks={max_gen} leaves no room in max_length={self.max_length}")
      sampling = G.SamplingSpec(
          max_new_tokens=max_gen, temperature=float(kwargs.get("temperature") or 0.0) if kwargs["do_sample"] else 0.0,
          top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0))
      prompts = {i: self._encode_prompt(requests[i].args[0], self.max_length - max_gen) for i in indices}
      order = sorted(indices, key=lambda i: -len(prompts[i]))
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        ids = self.generator().generate_ids([prompts[i] for i in chunk], sampling, seed=self.seed)
        for i, gen in zip(chunk, ids):
          out[i] = model_utils.postprocess_generated_text(self.tok_decode(gen), until, None)
        pbar.update(len(chunk))
    pbar.close()
    return out


# --- running tasks ---------------------------------------------------------------------------


def task_manager(include_path: str | None = None, include_defaults: bool = True):
  """lm-eval's TaskManager over its own tasks plus the YAML tasks under `include_path`."""
  import lm_eval.tasks
  if include_path and not os.path.isdir(include_path):
    raise UserError(f"--include_path={include_path}: no such directory")
  return lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(tasks: Sequence[str], manager) -> list[str]:
  """The task names, each a registered task/group/tag, a glob over them, or a YAML file."""
  tasks = [t.strip() for t in tasks if t.strip()]
  if not tasks:
    raise UserError("--tasks: no task given")
  for name in tasks:
    if name in manager.all_tasks or os.path.isfile(name) or manager.match_tasks([name]):
      continue
    where = " (nor under --include_path)" if manager.include_path else " (add its directory with --include_path)"
    raise UserError(f"--tasks: unknown task '{name}': not one of lm-eval's tasks{where}")
  return tasks


def load_tasks(tasks: Sequence[str], manager) -> list:
  """lm-eval's Task / Group objects for the names `check_tasks` accepted (globs expanded), datasets loaded:
  a dataset that cannot be had fails here, before any model is loaded, as one UserError naming the task,
  the dataset and the cause; `run_tasks` takes the objects in place of the names."""
  hub_log = logging.getLogger("huggingface_hub")
  level = hub_log.level
  hub_log.setLevel(logging.ERROR)  # its two lines per retry would bury the one error line
  built = []
  try:
    for name in tasks:
      for one in [name] if name in manager.all_tasks or os.path.isfile(name) else manager.match_tasks([name]):
        try:
          obj = manager._load_spec(one)  # per name, as manager.load does (lm-eval 0.4.13), keeping the objects
        except OSError as e:
          message = _dataset_error(one, e)
          if message is None:
            raise
          raise UserError(message) from e
        built.extend(obj if isinstance(obj, list) else [obj])
  finally:
    hub_log.setLevel(level)
  return built


def _dataset_error(name: str, e: OSError) -> str | None:
  """The one line for an OSError raised while lm-eval loaded a task's dataset; None if it was not that."""
  from lm_eval.api.task import Task
  task, tb = None, e.__traceback__
  while tb is not None:  # the innermost lm-eval task on the way down is the one whose dataset failed
    here = tb.tb_frame.f_locals.get("self")
    if isinstance(here, Task) and getattr(here, "DATASET_PATH", None):
      task = here
    tb = tb.tb_next
  if task is None:
    return None
  sub = getattr(getattr(task, "config", None), "task", None)
  which = f"task '{name}'" + (f" (its subtask '{sub}')" if sub and sub != name else "")
  dataset = f"'{task.DATASET_PATH}'" + (f" (config '{task.DATASET_NAME}')" if task.DATASET_NAME else "")
  reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  chain, cause = [], e
  while cause is not None and len(chain) < 20:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  if any(isinstance(c, ConnectionError) for c in chain):
    return (f"--tasks: {which} needs the dataset {dataset} from the Hugging Face Hub, which could not be "
            f"fetched ({reason}); without network, evaluate a local task instead: a task YAML over your own "
            f"data file, in a directory passed with --include_path")
  return f"--tasks: {which}: cannot load its dataset {dataset} ({reason})"


def run_tasks(lm: JaxLM, tasks: Sequence, manager, *, num_fewshot: int | None = None,
              limit: int | float | None = None, apply_chat_template: bool = False, system: str | None = None,
              bootstrap_iters: int = 100000) -> dict:
  """lm_eval.simple_evaluate on `lm` over task names or `load_tasks`' objects; returns the JSON document
  that scripts/evaluate.py writes.

  Keys: lm-eval's `results`, `groups`, `configs`, `versions`, `n-shot`, `higher_is_better`,
  `n-samples`, `config`, and `samples` (per task, per doc: lm-eval's resps / filtered_resps /
  metric values, plus this backend's recorded `loglikelihoods`: one entry per request).
  """
  from unittest import mock

  import lm_eval
  lm.records.clear()
  # lm-eval stamps results with `git describe` of the working directory, which says nothing
  # about the model or the harness; skip the subprocess.
  with mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None):
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        apply_chat_template=apply_chat_template, system_instruction=system, log_samples=True,
        bootstrap_iters=bootstrap_iters)
  recorded = collections.defaultdict(list)
  for r in lm.records:
    recorded[(r["task"], r["doc_id"])].append(r)
  samples = {}
  for task, rows in (out.get("samples") or {}).items():
    samples[task] = []
    for row in rows:
      row = {k: v for k, v in row.items() if k not in ("doc", "arguments")}
      row["loglikelihoods"] = [
          {k: v for k, v in r.items() if k not in ("task", "doc_id", "type")}
          for r in sorted(recorded.get((task, row["doc_id"]), []), key=lambda r: r["index"] or 0)]
      samples[task].append(row)
  keys = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
          "n-samples", "config")
  doc = {k: out[k] for k in keys if k in out}
  doc["samples"] = samples
  return json.loads(json.dumps(doc, default=lm_utils.handle_non_serializable))
