"""The backend scripts run on: JAX_PLATFORMS when set, else JAX's own platform discovery; libtpu kept quiet
on hosts JAX counts no TPU chip on. No device files are looked at."""

import os
import subprocess
import sys

import pytest

from anita_jax.apps import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def no_count():
  raise AssertionError("JAX_PLATFORMS is set: nothing to count")


@pytest.mark.parametrize("platforms", ["cpu", "rocm", "cuda,cpu", "tpu"])
def test_jax_platforms_when_set_is_the_choice_and_nothing_else_changes(platforms):
  environ = {"JAX_PLATFORMS": platforms}
  assert cli.choose_backend(environ, tpu_chips=no_count) == platforms
  assert environ == {"JAX_PLATFORMS": platforms}


@pytest.mark.parametrize("chips, told", [(0, True), (4, False), (None, False)])
def test_unset_jax_platforms_leaves_the_choice_to_jax(chips, told):
  """Unset (or empty) JAX_PLATFORMS stays unset, whatever the host has; libtpu is described a host of its
  own only where JAX's count finds no TPU (None: libtpu is not installed)."""
  for environ in ({}, {"JAX_PLATFORMS": ""}):
    before = dict(environ)
    assert cli.choose_backend(environ, tpu_chips=lambda: chips) is None
    assert environ.get("JAX_PLATFORMS") == before.get("JAX_PLATFORMS")
    quiet = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1"}
    assert {k: environ[k] for k in quiet if k in environ} == (quiet if told else {})


def test_given_tpu_settings_are_kept():
  environ = {"TPU_WORKER_HOSTNAMES": "10.0.0.2", "TPU_HOST_BOUNDS": "2,2,1"}
  cli.choose_backend(environ, tpu_chips=lambda: 0)
  assert environ == {"TPU_WORKER_HOSTNAMES": "10.0.0.2", "TPU_HOST_BOUNDS": "2,2,1"}


def test_a_script_without_jax_platforms_runs_on_what_jax_discovers_and_quietly():
  """In a fresh process with JAX_PLATFORMS unset, importing the scripts' module leaves it unset (no forced CPU)
  and JAX's start-up prints no libtpu warnings."""
  code = ("from anita_jax.apps import cli\nimport os, jax\n"
          "print(os.environ.get('JAX_PLATFORMS'), jax.default_backend())")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS")}
  result = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": ROOT}, capture_output=True,
                          text=True, timeout=300, check=True)
  chosen, backend = result.stdout.split()
  assert chosen == "None"
  reference = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], env=env,
                             capture_output=True, text=True, timeout=300, check=True)
  assert backend == reference.stdout.strip()  # what JAX itself picks on this host
  assert "TPU" not in result.stderr, result.stderr
