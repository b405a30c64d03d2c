"""The Examples in the public docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = ["hizoo_jax.estimator", "hizoo_jax.alias", "hizoo_jax.sharding",
           "hizoo_jax.checkpoint", "hizoo_jax.train_step",
           "hizoo_jax.masking", "hizoo_jax.precision", "hizoo_jax.skipping",
           "hizoo_jax.core.fzoo"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
