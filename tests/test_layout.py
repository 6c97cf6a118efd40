"""The package's shape: one-way layers, one reader of the ConfigDict, configs without JAX, small modules."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "anita_jax"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 450


def _imports(path: pathlib.Path) -> set[str]:
  """Every module a file imports, function-level imports included."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
  return out


def test_layers_import_only_downwards():
  """import-linter's layers contracts in pyproject.toml: apps > train > infer > data > convert > model >
  files > errors, and inside train; a cycle breaks them too."""
  out = subprocess.run(["lint-imports", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "0 broken" in out.stdout


def test_only_the_training_config_and_apps_read_config_dicts():
  readers = {str(p.relative_to(ROOT)) for p in MODULES
             if any(m.split(".")[0] == "ml_collections" for m in _imports(p))}
  allowed = {"anita_jax/train/config.py"} | {str(p.relative_to(ROOT)) for p in (PACKAGE / "apps").glob("*.py")}
  assert readers and readers <= allowed, readers - allowed


@pytest.mark.parametrize("config", ["configs/anita_demo.py", "configs/anita_8b.py"])
def test_configs_build_without_jax(config):
  code = f"""
import runpy, sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'orbax'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
get = runpy.run_path({str(ROOT / config)!r})['get_config']
recipe = get(None)
for stage in ('sft', 'dpo', 'lm'):
  assert get(stage).stage == stage and recipe[stage].stage == stage
print('ok')
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
  assert len(path.read_text().splitlines()) <= MAX_LINES


def _stage_comparisons(path: pathlib.Path) -> list[int]:
  """Lines comparing something named `stage` with a stage name ('sft', 'dpo', 'lm')."""
  lines = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Compare):
      sides = [node.left, *node.comparators]
      named = any((isinstance(s, ast.Attribute) and s.attr == "stage") or (isinstance(s, ast.Name) and s.id == "stage")
                  for s in sides)
      literal = any(isinstance(s, ast.Constant) and s.value in ("sft", "dpo", "lm") for s in sides)
      if named and literal:
        lines.append(node.lineno)
  return lines


def test_no_stage_branches_outside_the_objectives():
  """What differs between stages lives in their `Objective` (train/objective.py, train/dpo.py)."""
  found = {str(p.relative_to(ROOT)): _stage_comparisons(p) for p in MODULES}
  assert {k: v for k, v in found.items() if v} == {}
