"""llama.cpp (llama-cpp-python) on a GGUF file, always in a child process of its own.

llama.cpp built from source brings its own OpenMP runtime and thread pool; in a process that has imported JAX
its `decode` can segfault, and a segfault in a pytest-xdist worker kills the worker and hangs the run. So every
use goes through `run`: a child `python -m anita_jax.infer.llama_cpp` that never imports JAX (this module
imports only the standard library and NumPy, and the package `__init__` files import nothing eagerly) reads one
request as JSON on stdin and answers JSON on stdout. A crash, a non-zero exit or a timeout of the child is one
LlamaCppError naming its exit status and the tail of its stderr: one failed call, never a dead caller.

Jobs, answered in order (greedy is llama.cpp's own sampler at temperature 0, top-k 1, no repeat penalty):
  {"tokenize": TEXT, "special": BOOL}            -> ids of TEXT, no BOS added
  {"greedy": IDS, "n_new": N, "stop": [ids]}      -> up to N new ids, ending before the first stop id
  {"logits": IDS, "out": PATH}                    -> PATH: float32 [len(IDS), vocab] saved with np.save
  {"logprobs": IDS}                               -> log p(IDS[i] | IDS[:i]) for every i >= 1
"""

import faulthandler
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

MODULE = "anita_jax.infer.llama_cpp"
INSTALL = "pip install llama-cpp-python==0.3.36"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TAIL_CHARS = 3000


class LlamaCppError(RuntimeError):
  """The llama.cpp child failed: crashed on a signal, exited non-zero, ran past its timeout or answered garbage."""


def available() -> bool:
  """Whether llama-cpp-python is installed, found without importing (loading) it into this process."""
  return importlib.util.find_spec("llama_cpp") is not None


def run(gguf_path, jobs: list[dict], *, n_ctx: int = 512, f32_cache: bool = False,
        timeout: float = 600.0) -> list:
  """The answers to `jobs` (see the module docstring) from one child holding the model of `gguf_path`.
  f32_cache: llama.cpp's KV cache in float32 instead of its default float16."""
  return _spawn({"model": os.fspath(gguf_path), "n_ctx": n_ctx, "f32_cache": f32_cache, "jobs": list(jobs)}, timeout)


def tokenize(gguf_path, texts: list[str], *, special: bool = True, **options) -> list[list[int]]:
  """llama.cpp's own tokenizer (the file's vocabulary) on each text; no BOS added."""
  return run(gguf_path, [{"tokenize": t, "special": special} for t in texts], **options)


def greedy(gguf_path, prompt_ids: list[list[int]], n_new: int, *, stop=(), **options) -> list[list[int]]:
  """Each prompt's greedy continuation of up to `n_new` tokens, ending before the first token in `stop`."""
  stop = sorted(int(t) for t in stop)
  return run(gguf_path, [{"greedy": list(map(int, p)), "n_new": n_new, "stop": stop} for p in prompt_ids], **options)


def logits(gguf_path, rows: list[list[int]], **options) -> list[np.ndarray]:
  """float32 [len(row), vocab] logits of every position of each row (passed through .npy files, not JSON)."""
  with tempfile.TemporaryDirectory(prefix="llama_cpp_") as tmp:
    jobs = [{"logits": list(map(int, r)), "out": os.path.join(tmp, f"{i}.npy")} for i, r in enumerate(rows)]
    return [np.load(path) for path in run(gguf_path, jobs, **options)]


def logprobs(gguf_path, rows: list[list[int]], **options) -> list[list[float]]:
  """Each row's log-probabilities of its tokens after the first, from llama.cpp's logits."""
  return run(gguf_path, [{"logprobs": list(map(int, r))} for r in rows], **options)


def _exit_status(code: int) -> str:
  if code >= 0:
    return str(code)
  try:
    return f"{code} ({signal.Signals(-code).name})"
  except ValueError:
    return str(code)


def _tail(stderr) -> str:
  if isinstance(stderr, bytes):
    stderr = stderr.decode(errors="replace")
  stderr = (stderr or "").strip()
  return f"; the tail of its stderr:\n{stderr[-_TAIL_CHARS:]}" if stderr else "; nothing on its stderr"


def _spawn(request: dict, timeout: float) -> list:
  """Runs the child on one request. Its environment puts this checkout first on PYTHONPATH, so the child
  imports the same code from any working directory."""
  path = os.environ.get("PYTHONPATH")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, path] if path else [_ROOT])}
  what = f"llama.cpp child ({sys.executable} -m {MODULE}) on {request.get('model')}"
  try:
    out = subprocess.run([sys.executable, "-m", MODULE], input=json.dumps(request), capture_output=True, text=True,
                         timeout=timeout, env=env, check=False)
  except subprocess.TimeoutExpired as e:
    raise LlamaCppError(f"{what} ran past its timeout of {timeout:g} s and was killed{_tail(e.stderr)}") from None
  if out.returncode != 0:
    raise LlamaCppError(f"{what} failed with exit status {_exit_status(out.returncode)}{_tail(out.stderr)}")
  try:
    return json.loads(out.stdout)["results"]
  except (ValueError, KeyError, TypeError):
    raise LlamaCppError(f"{what} exited 0 without an answer on stdout{_tail(out.stderr)}") from None


# The child -------------------------------------------------------------------------------------------------

def _scores(llm, ids: list[int]) -> np.ndarray:
  llm.reset()
  llm.eval(ids)
  return np.array(llm.scores[:len(ids)], dtype=np.float32)


def _greedy(llm, ids: list[int], n_new: int, stop: set[int]) -> list[int]:
  llm.reset()
  got = []
  if n_new <= 0:
    return got
  for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
    if int(token) in stop:
      break
    got.append(int(token))
    if len(got) == n_new:
      break
  return got


def _answer(llm, job: dict):
  if "tokenize" in job:
    return llm.tokenize(job["tokenize"].encode(), add_bos=False, special=job.get("special", True))
  if "greedy" in job:
    return _greedy(llm, job["greedy"], job["n_new"], set(job.get("stop", ())))
  if "logits" in job:
    np.save(job["out"], _scores(llm, job["logits"]))
    return job["out"]
  if "logprobs" in job:
    ids = job["logprobs"]
    x = _scores(llm, ids).astype(np.float64)[:-1]
    logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return (x[np.arange(len(ids) - 1), ids[1:]] - logz).tolist()
  raise ValueError(f"unknown llama.cpp job with keys {sorted(job)}")


def _load(request: dict):
  """The model of the request's GGUF file; exits non-zero with one line when the file or llama_cpp is missing."""
  if not os.path.isfile(request["model"]):
    sys.exit(f"error: no GGUF file at {request['model']}")
  try:
    import llama_cpp
  except ImportError:
    sys.exit(f"error: llama-cpp-python is not installed ({INSTALL})")
  jobs = request["jobs"]
  f32 = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if request.get("f32_cache") else {}
  return llama_cpp.Llama(model_path=request["model"], n_ctx=request["n_ctx"], seed=0, verbose=False,
                         logits_all=any("logits" in j or "logprobs" in j for j in jobs), **f32)


def main() -> None:
  """The child: one request on stdin, {"results": [...]} on stdout. Whatever llama.cpp itself prints goes to
  stderr (fd 1 is pointed there), so stdout carries the answer alone; faulthandler puts a crash's Python stack
  on stderr. `test_signal` and `test_sleep` are the tests' ways to show a crash and a hang (no llama_cpp needed)."""
  faulthandler.enable()
  answer = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  request = json.load(sys.stdin)
  if request.get("test_sleep"):
    time.sleep(request["test_sleep"])
  if request.get("test_signal"):
    os.kill(os.getpid(), request["test_signal"])
  llm = _load(request)
  results = [_answer(llm, job) for job in request["jobs"]]
  json.dump({"results": results}, answer)
  answer.close()


if __name__ == "__main__":
  main()
