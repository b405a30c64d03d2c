"""Every fenced Python block of README.md and docs/*.md runs.

The blocks of one document run in order in one namespace, so a block may use
what an earlier block of the same document defined. What a document leaves
to the reader (a model, its loss, a batch) comes from a small preamble here:
``PREAMBLE`` runs before a document's first block, ``BEFORE`` before the
block containing a given line, ``AFTER`` once the document's blocks have run
(calls that check that what the blocks built works).

A block that cannot run here is marked in the document by the comment
``<!-- not run: why -->`` on the line just before its fence, and the
document says why in its text too. Blocks that import an optional package
(flax, orbax, tunix) are skipped only when that package is missing: CI
installs ``.[test,hf]``, so they run there.

Shapes are tiny and steps few: the whole file takes seconds.
"""

import dataclasses
import glob
import importlib.util
import os
import re
import textwrap
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")


@dataclasses.dataclass
class Block:
  doc: str
  line: int  # 1-based line of the opening fence
  code: str
  not_run: str | None  # the reason, if marked


def blocks(doc: str) -> list[Block]:
  """The ```python blocks of ``doc``, dedented (blocks may sit in lists)."""
  with open(os.path.join(ROOT, doc)) as f:
    lines = f.read().splitlines()
  out, i = [], 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m or not m.group(2):
      i += 1
      continue
    lang, start = m.group(2), i
    j = i + 1
    while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
      j += 1
    if lang == "python":
      prev = lines[start - 1] if start else ""
      mark = _NOT_RUN.search(prev)
      out.append(Block(doc, start + 1, textwrap.dedent("\n".join(
          lines[start + 1:j])), mark.group(1) if mark else None))
    i = j + 1
  return out


# --- What the documents leave to the reader ---------------------------------

_TINY = """
import jax, jax.numpy as jnp, numpy as np, optax
import hizoo_jax as hz

# Two tensors: an embedding and two stacked layers (the README's stacked=).
params = {"embed": 0.3 * jnp.ones((8, 4)),
          "layers": {"w": 0.1 * jnp.ones((2, 4, 4))}}

def loss(p, batch):
  x, y = batch
  h = x @ p["embed"]
  for i in range(p["layers"]["w"].shape[0]):
    h = h + jnp.tanh(h @ p["layers"]["w"][i])
  return jnp.mean((h.sum(-1) - y) ** 2)

loss_fn = loss
batch = (jnp.ones((8, 8)), jnp.zeros((8,)))
"""

_NNX = """
from flax import nnx
model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
"""

_MESH = """
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
_mesh = jax.make_mesh((jax.device_count(),), ("data",),
                      axis_types=(AxisType.Auto,))
param_shardings = jax.tree.map(lambda a: NamedSharding(_mesh, P()), params)
batch_sh = NamedSharding(_mesh, P("data"))
step_number = 1

def step_fn(params, state, batch):
  updates, state = tx.update(None, state, params,
                             value_fn=lambda p: loss(p, batch))
  return optax.apply_updates(params, updates), state
"""

PREAMBLE = {
    "README.md": _TINY + _NNX,
    "docs/api.md": _TINY,
    "docs/choosing.md": _TINY,
    "docs/performance.md": _TINY + "data = [batch, batch]\n",
    "docs/distributed.md": """
import jax, jax.numpy as jnp, flax.linen as nn

class MyFlaxModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(jnp.tanh(nn.Dense(16)(x)))

example_batch = jnp.ones((8, 8))
batches = [{"x": jnp.ones((8, 8)), "y": jnp.zeros((8,), jnp.int32)}] * 2
""",
    "docs/finetuning.md": """
import jax, jax.numpy as jnp

base_params = {"encoder": {n: {"kernel": 0.2 * jnp.eye(8)}
                           for n in ("query", "value", "out")}}

def model_loss(params, batch):
  x, y = batch
  h = x
  for n in ("query", "value", "out"):
    h = jnp.tanh(h @ params["encoder"][n]["kernel"])
  return jnp.mean((h.sum(-1) - y) ** 2)

batch = (jnp.ones((4, 8)), jnp.ones((4,)))
""",
}

# A tiny random Qwen3 for the tunix blocks (as tests/test_tunix.py builds it).
_QWEN3 = """
import numpy as np, jax.numpy as jnp
from flax import nnx
from tunix.models.qwen3 import model as qwen3
from tunix.sft import utils as sft_utils
config = qwen3.ModelConfig(num_layers=1, vocab_size=64, embed_dim=32,
                           hidden_dim=64, num_heads=2, head_dim=16,
                           num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6)
model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 16)),
                     jnp.int32)
mask = jnp.ones(tokens.shape, jnp.bool_)
positions = sft_utils.build_positions_from_mask(mask)
attn_mask = sft_utils.make_causal_attn_mask(mask)
batches = [(tokens, mask)]
"""

# Keyed by (document, a line of the block): code run just before that block.
BEFORE = {
    ("README.md", "hz.state_shardings(tx, params, param_shardings)"): _MESH,
    ("docs/distributed.md", "jax.set_mesh(mesh):\n  params = jax.device_put"):
        "from jax.sharding import PartitionSpec as P\n"
        "specs = jax.tree.map(lambda a: P(), params)\n",
    ("docs/distributed.md", "hz.save_checkpoint(ckpt_dir"):
        "ckpt_dir = str(_tmp / 'ckpt')\nstep = 1\n"
        "abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct("
        "a.shape, a.dtype, sharding=a.sharding), params)\n",
    ("docs/finetuning.md", "model = MyModel(rngs=nnx.Rngs(0))"): """
from flax import nnx

class MyModel(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 1, rngs=rngs)

  def __call__(self, x):
    return self.linear(x)

x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
""",
    ("docs/finetuning.md", "# 1. nnx.Optimizer"): _QWEN3,
    ("docs/distributed.md", "def create():\n  model = qwen3.Qwen3"): _QWEN3,
    ("docs/finetuning.md", "linen_zo_step, static_argnums"):
        "import flax.linen as nn\nnet = nn.Dense(1)\n"
        "x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))\n"
        "params = net.init(jax.random.key(0), x)\n",
}

# Keyed like BEFORE: code run just after that block (checks that what it
# built works, before later blocks reuse the names).
AFTER_BLOCK = {
    ("docs/finetuning.md", "model = MyModel(rngs=nnx.Rngs(0))"):
        "assert jnp.isfinite(train_step(model, optimizer, x, y))\n",
}

# Checks after a document's blocks ran: what they built works.
AFTER = {
    "README.md": """
assert np.isfinite(float(metrics["loss"]))
for _ in range(2):
  assert np.isfinite(float(train_step(model, optimizer, x, y)))
_, params, state = hz.restore_checkpoint("ckpt", params, state)
""",
    "docs/api.md": """
p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
tx = hz.master_weights(hz.mezo(1e-4))
step = hz.make_train_step(tx, loss_fn)
p16, s16, m = step(p16, tx.init(p16), batch)
assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(p16))
assert np.isfinite(float(m["loss"]))
""",
    "docs/finetuning.md": """
assert jnp.isfinite(zo.loss)
""",
    "docs/choosing.md": """
H = hz.curvature_tree(state, theta, expand=False)
assert float(H["stiff"].ravel()[0]) / float(H["soft"].ravel()[0]) > 50, H
H1 = hz.curvature_tree(state1, one, expand=False)
assert float(H1["w"].ravel()[0]) == 1.0, H1
assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(p16))
assert np.isfinite(float(metrics["loss"]))
""",
}


# Packages whose absence skips only the blocks that import them (the tunix
# extra, installed on CI's second leg); the others skip the whole document.
PER_BLOCK = ("tunix", "qwix")


# Blocks that continue a block importing such a package (keyed like BEFORE).
CONTINUES = {
    ("docs/distributed.md", "graphdef, params, rest = nnx.split(model"):
        ("tunix",),
}


def _has(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


def _needs(code: str) -> list[str]:
  """Optional packages a block imports."""
  found = []
  for mod, pat in (("flax", r"\bflax\b"), ("orbax.checkpoint", r"save_checkpoint"),
                   ("tunix", r"\btunix\b"), ("qwix", r"\bqwix\b")):
    if re.search(pat, code):
      found.append(mod)
  return found


def test_blocks_are_found_and_marks_say_why():
  every = [b for d in DOCS for b in blocks(d)]
  assert len(every) > 20
  for b in every:
    if b.not_run is not None:
      assert len(b.not_run) > 10, (b.doc, b.line)
  for doc, needle in list(BEFORE) + list(AFTER_BLOCK) + list(CONTINUES):
    assert any(needle in b.code for b in blocks(doc)), (doc, needle)
  assert "docs/choosing.md" in DOCS


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d)])
def test_doc_blocks_run(doc, tmp_path, monkeypatch):
  found = blocks(doc)
  runnable = [b for b in found if b.not_run is None]
  for b in runnable:
    for mod in _needs(b.code):
      if mod not in PER_BLOCK:
        pytest.importorskip(mod)
  monkeypatch.chdir(tmp_path)  # checkpoints and files land here
  ns = {"__name__": f"doc_{os.path.basename(doc)}", "_tmp": tmp_path}
  if doc in PREAMBLE:
    for mod in _needs(PREAMBLE[doc]):
      pytest.importorskip(mod)
    exec(compile(PREAMBLE[doc], f"<preamble {doc}>", "exec"), ns)
  for b in runnable:
    needs = _needs(b.code) + [m for (d, needle), mods in CONTINUES.items()
                              if d == doc and needle in b.code for m in mods]
    missing = [m for m in needs if m in PER_BLOCK and not _has(m)]
    if missing:  # this block only; the others still run
      warnings.warn(f"{doc}:{b.line} not run: {missing} not installed")
      continue
    for (d, needle), code in BEFORE.items():
      if d == doc and needle in b.code and code:
        exec(compile(code, f"<before {doc}:{b.line}>", "exec"), ns)
    try:
      exec(compile(b.code, f"{doc}:{b.line}", "exec"), ns)
    except Exception as e:  # name the block in the failure
      raise AssertionError(
          f"the python block at {doc}:{b.line} failed: {e!r}") from e
    for (d, needle), code in AFTER_BLOCK.items():
      if d == doc and needle in b.code:
        exec(compile(code, f"<after {doc}:{b.line}>", "exec"), ns)
  if doc in AFTER:
    exec(compile(AFTER[doc], f"<after {doc}>", "exec"), ns)


def test_no_example_freezes_h_with_the_paper_rate():
  """``hessian_smooth=1e-6`` is the paper rule's EMA rate; under the default
  signed rule it leaves H at 1 (docs/choosing.md). An example may pass such
  a rate only with ``estimator="paper"`` or ``"reference"``."""
  tiny = re.compile(r"hessian.smooth[= ]+1e-[6-9]|scale_by_hizoo\([^,()]+,\s*1e-[6-9]")
  lines = [(f"{b.doc}:{b.line}", line) for d in DOCS for b in blocks(d)
           for line in b.code.splitlines()]
  for path in glob.glob(os.path.join(ROOT, "hizoo_jax", "**", "*.py"),
                        recursive=True):
    with open(path) as f:
      lines += [(f"{path}:{n}", line) for n, line in enumerate(f, 1)]
  for where, line in lines:
    if tiny.search(line) and "paper" not in line and "reference" not in line:
      raise AssertionError(f"{where}: {line.strip()}")
