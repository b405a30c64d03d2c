"""How much of the package a reader walks through to follow one update.

Traces one ``hz.hizoo`` (and ``hz.mezo``, ``hz.fzoo``) update under
``jax.jit`` on each program (:mod:`hizoo_jax.program`) and counts the
package's modules and distinct functions entered (comprehensions and lambdas
included), then lists the package's functions longer than 80 lines and each
estimator's ``update_fn`` length. Writes ``results/readability.{json,md}``.

    python benchmarks/readability.py
"""

from __future__ import annotations

import ast
import collections
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp

import hizoo_jax as hz

ROOT = os.path.dirname(hz.__file__)
HERE = os.path.dirname(os.path.abspath(__file__))
ALIASES = {"hizoo": lambda p: hz.hizoo(1e-3, program=p),
           "mezo": lambda p: hz.mezo(1e-3, program=p),
           "fzoo": lambda p: hz.fzoo(1e-3)}  # one program: the core's
PROGRAMS = {"hizoo": ("compact", "plain"), "mezo": ("compact", "plain"),
            "fzoo": ("plain",)}


def entered(alias: str, program: str) -> dict:
  """{module: [functions]} entered while tracing one jitted update."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}

  def loss(p):
    return jnp.sum((p["w"] @ jnp.ones(3)) ** 2) + jnp.sum(p["b"] ** 2)

  tx = ALIASES[alias](program)
  state = tx.init(params)
  seen = collections.defaultdict(set)

  def profile(frame, event, arg):
    del arg
    name = frame.f_code.co_filename
    if event == "call" and name.startswith(ROOT):
      seen[os.path.relpath(name, ROOT)].add(
          (frame.f_code.co_name, frame.f_code.co_firstlineno))

  step = jax.jit(lambda s, p: tx.update(p, s, p, value_fn=loss))
  sys.setprofile(profile)
  try:
    step.trace(state, params)
  finally:
    sys.setprofile(None)
  return {m: sorted(f"{n}:{line}" for n, line in fs)
          for m, fs in sorted(seen.items())}


def long_functions(limit: int = 80) -> list:
  """(module, function, lines) for every def in the package over ``limit``
  lines (its docstring not counted), and every ``update_fn``."""
  out = []
  for folder, _, files in os.walk(ROOT):
    for f in sorted(files):
      if not f.endswith(".py"):
        continue
      path = os.path.join(folder, f)
      tree = ast.parse(open(path).read())
      for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          lines = node.end_lineno - node.lineno + 1
          doc = node.body[0]
          if (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
              and isinstance(doc.value.value, str)):
            lines -= doc.end_lineno - doc.lineno + 1
          if lines > limit or node.name == "update_fn":
            out.append((os.path.relpath(path, ROOT), node.name, lines))
  return sorted(out)


def main():
  record = {"date": datetime.date.today().isoformat(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "traces": {}, "long_functions": []}
  lines = [f"# Readability ({record['date']}, jax {jax.__version__}, "
           f"{jax.default_backend()})", "",
           "Command: `python benchmarks/readability.py`.", "",
           "Functions: distinct code objects entered (named: without "
           "lambdas and comprehensions).", "",
           "| update | program | modules | functions | named functions |",
           "| --- | --- | --- | --- | --- |"]
  for alias in ALIASES:
    for program in PROGRAMS[alias]:
      seen = entered(alias, program)
      record["traces"][f"{alias}/{program}"] = seen
      count = sum(map(len, seen.values()))
      named = sum(not f.startswith("<") for fs in seen.values() for f in fs)
      lines.append(f"| hz.{alias} | {program} | {len(seen)} | {count} | "
                   f"{named} |")
  lines += ["", "Functions over 80 lines (docstrings not counted), and every "
            "`update_fn`:", "",
            "| module | function | lines |", "| --- | --- | --- |"]
  for module, name, n in long_functions():
    record["long_functions"].append([module, name, n])
    lines.append(f"| {module} | {name} | {n} |")
  out = os.path.join(HERE, "results", "readability")
  with open(out + ".json", "w") as f:
    json.dump(record, f, indent=1)
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
