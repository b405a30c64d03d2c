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
import os
import re
import textwrap

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
    ("docs/finetuning.md", "linen_zo_step, static_argnums"):
        # First check the NNX block's step, then set up the Linen one.
        "assert jnp.isfinite(train_step(model, optimizer, x, y))\n"
        "import flax.linen as nn\nnet = nn.Dense(1)\n"
        "x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))\n"
        "params = net.init(jax.random.key(0), x)\n",
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
  for doc, needle in BEFORE:
    assert any(needle in b.code for b in blocks(doc)), (doc, needle)
  assert "docs/choosing.md" in DOCS


@pytest.mark.parametrize("doc", DOCS)
def test_doc_blocks_run(doc, tmp_path, monkeypatch):
  found = blocks(doc)
  if not found:
    pytest.skip(f"{doc} has no python blocks")
  runnable = [b for b in found if b.not_run is None]
  for b in runnable:
    for mod in _needs(b.code):
      pytest.importorskip(mod)
  monkeypatch.chdir(tmp_path)  # checkpoints and files land here
  ns = {"__name__": f"doc_{os.path.basename(doc)}", "_tmp": tmp_path}
  if doc in PREAMBLE:
    for mod in _needs(PREAMBLE[doc]):
      pytest.importorskip(mod)
    exec(compile(PREAMBLE[doc], f"<preamble {doc}>", "exec"), ns)
  for b in runnable:
    for (d, needle), code in BEFORE.items():
      if d == doc and needle in b.code and code:
        exec(compile(code, f"<before {doc}:{b.line}>", "exec"), ns)
    try:
      exec(compile(b.code, f"{doc}:{b.line}", "exec"), ns)
    except Exception as e:  # name the block in the failure
      raise AssertionError(
          f"the python block at {doc}:{b.line} failed: {e!r}") from e
  if doc in AFTER:
    exec(compile(AFTER[doc], f"<after {doc}>", "exec"), ns)
