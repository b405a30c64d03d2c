"""Packaging: version ranges, extras, py.typed, and CI calling README's command."""

import importlib.resources
import os
import re

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_py_typed_ships_with_the_package():
  assert importlib.resources.files("hizoo_jax").joinpath("py.typed").is_file()
  data = _project()["tool"]["setuptools"]["package-data"]
  assert "py.typed" in data["hizoo_jax"]


def test_no_upper_caps_that_would_downgrade_jax_or_flax():
  """A cap below an installed jax/flax makes pip downgrade it (issue 23)."""
  project = _project()["project"]
  reqs = list(project["dependencies"])
  for extra, items in project["optional-dependencies"].items():
    if extra != "hf":  # transformers < 5: the Flax classes, which 5 removed
      reqs += items
  for req in reqs:
    name = re.split(r"[<>=!~ \[]", req, maxsplit=1)[0]
    assert "<" not in req, f"{req}: an upper cap on {name}"
  assert "jax>=0.10.2" in project["dependencies"]
  extras = project["optional-dependencies"]
  assert extras["hf"] == ["transformers>=4.57,<5"]
  assert not any("transformers" in r for r in extras["examples"] + extras["test"])
  assert {r.split(">")[0] for r in extras["tunix"]} == {"google-tunix", "qwix"}


def test_ci_runs_readmes_test_command():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = f.read()
  command = re.search(r"```bash\n(python3 -m venv .*pytest -q[^\n]*)\n```",
                      readme).group(1)
  assert "[test" in command
  assert command in ci
  assert "python3.12 -m venv" in ci and "tunix" in ci
