"""LoRA as a parameter transformation: ``W_eff = W + scale * A @ B``.

The base parameters stay frozen; the trainable tree holds only the low-rank
factors, so a zeroth-order optimizer perturbs and updates only ``A`` and ``B``
(and keeps curvature state only for them). The adapters are a flat dict keyed
by the ``/``-joined path of the kernel they modify::

  {"encoder/layer/0/attention/self/query/kernel": {"a": (in, r), "b": (r, out)}}

A kernel is a leaf named ``kernel`` (Flax), ``weight`` (PyTorch-style) or
``w`` (tunix's NNX models); a trailing ``value`` (the ``.value`` of an NNX
``Variable`` in ``nnx.state`` / ``nnx.split`` trees) is looked through. A
kernel with more than two axes is treated as ``(shape[0], prod(shape[1:]))``.

For NNX models, prefer qwix (``qwix.LoraProvider`` and
``qwix.apply_lora_to_model``): its adapters are ``nnx.LoRAParam`` variables
inside the model, applied in the forward pass as ``x @ A @ B`` without forming
``W + A @ B``, and trained with ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)``; see docs/finetuning.md. This module suits functional
parameter trees (Linen, Hugging Face Flax, an ``nnx.split`` state) where the
adapters should be a tree of their own.
``A`` starts random (std ``1/sqrt(in)``) and ``B`` at zero, so ``W_eff = W``
at step 0.

Example:
  >>> import jax, jax.numpy as jnp, optax, hizoo_jax as hz
  >>> from hizoo_jax.lora import lora_init, lora_merge
  >>> base = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  >>> adapters = lora_init(jax.random.key(0), base, rank=2,
  ...                      targets=("kernel",))
  >>> sorted(adapters)
  ['dense/kernel']
  >>> def loss(adapters, x):
  ...   p = lora_merge(base, adapters, scale=1.0)
  ...   return jnp.sum((x @ p["dense"]["kernel"]) ** 2)
  >>> tx = hz.mezo(1e-3)
  >>> state = tx.init(adapters)
  >>> updates, state = tx.update(None, state, adapters,
  ...                            value_fn=lambda a: loss(a, jnp.ones(4)))
  >>> adapters = optax.apply_updates(adapters, updates)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp

Targets = Union[Sequence[str], Callable[[str, Any], bool]]
KERNEL_NAMES = ("kernel", "weight", "w")


def path_name(path) -> str:
  """``/``-joined names of a tree path, e.g. ``encoder/layer/0/kernel``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _selected(name: str, leaf, targets: Targets) -> bool:
  if jnp.ndim(leaf) < 2 or not jnp.issubdtype(
      jnp.result_type(leaf), jnp.floating):
    return False
  if callable(targets):
    return bool(targets(name, leaf))
  parts = name.split("/")
  if len(parts) > 1 and parts[-1] == "value":  # an NNX Variable's value
    parts = parts[:-1]
  return parts[-1] in KERNEL_NAMES and any(t in parts for t in targets)


def lora_init(
    key: jax.Array,
    params,
    *,
    rank: int = 8,
    targets: Targets = ("query", "value"),
    dtype=jnp.float32,
) -> dict:
  """Low-rank adapters for the kernels of ``params`` that ``targets`` selects.

  Args:
    key: a PRNG key for the random ``A`` factors.
    params: the base parameter tree (only paths, shapes and dtypes are read).
    rank: the rank r of every adapter, >= 1.
    targets: names of path components whose kernels (leaves named
      ``kernel``, ``weight`` or ``w``, optionally followed by an NNX
      ``value``) get an adapter (e.g. ``("query", "value")`` for BERT
      attention, ``("q_proj", "v_proj")`` for OPT or tunix's Qwen3), or a
      callable ``(path_name, leaf) -> bool``.
      Only floating leaves with ndim >= 2 are eligible.
    dtype: dtype of the factors (float32 by default, also for bf16 models).

  Returns:
    A dict ``{path_name: {"a": (in, r), "b": (r, out)}}``.

  Raises:
    ValueError: bad rank, or no leaf matches ``targets``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from hizoo_jax.lora import lora_init
    >>> p = {"query": {"kernel": jnp.zeros((8, 8))}}
    >>> a = lora_init(jax.random.key(0), p, rank=2)
    >>> a["query/kernel"]["a"].shape, a["query/kernel"]["b"].shape
    ((8, 2), (2, 8))
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be an int >= 1, got {rank!r}.")
  if not callable(targets) and isinstance(targets, str):
    targets = (targets,)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = [(path_name(p), x) for p, x in flat
            if _selected(path_name(p), x, targets)]
  if not chosen:
    raise ValueError(
        f"no kernel matches LoRA targets {targets!r}; some parameter paths: "
        f"{[path_name(p) for p, _ in flat[:8]]}.")
  adapters = {}
  for i, (name, x) in enumerate(chosen):
    shape = jnp.shape(x)
    fan_in, fan_out = shape[0], math.prod(shape[1:])
    r = min(rank, fan_in, fan_out)
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, r), jnp.float32)
    adapters[name] = {
        "a": (a / math.sqrt(fan_in)).astype(dtype),
        "b": jnp.zeros((r, fan_out), dtype),
    }
  return adapters


def lora_merge(params, adapters: dict, *, scale: float = 1.0):
  """``params`` with ``W + scale * A @ B`` in place of every adapted kernel.

  Differentiable and jit-friendly; the sum is formed in float32 and cast back
  to the kernel's dtype (e.g. bf16).

  Args:
    params: the frozen base tree.
    adapters: the dict from :func:`lora_init` (possibly trained).
    scale: multiplier of ``A @ B`` (LoRA's ``alpha / r``).

  Returns:
    A tree like ``params``.

  Raises:
    ValueError: an adapter names a path that ``params`` does not have, or its
      shapes do not fit the kernel.

  Example:
    >>> import jax.numpy as jnp
    >>> from hizoo_jax.lora import lora_merge
    >>> p = {"k": jnp.zeros((2, 2))}
    >>> a = {"k": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))}}
    >>> lora_merge(p, a, scale=0.5)["k"]
    Array([[0.5, 0.5],
           [0.5, 0.5]], dtype=float32)
  """
  seen = set()

  def merge_leaf(path, w):
    name = path_name(path)
    pair = adapters.get(name)
    if pair is None:
      return w
    seen.add(name)
    shape = jnp.shape(w)
    a, b = pair["a"], pair["b"]
    if (len(shape) < 2 or a.shape[0] != shape[0] or b.shape[0] != a.shape[1]
        or b.shape[1] != math.prod(shape[1:])):
      raise ValueError(
          f"LoRA adapter {name!r} has A {a.shape} and B {b.shape}, which do "
          f"not fit the kernel of shape {shape}.")
    delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
    out = w.astype(jnp.float32) + scale * delta.reshape(shape)
    return out.astype(w.dtype)

  merged = jax.tree_util.tree_map_with_path(merge_leaf, params)
  unknown = sorted(set(adapters) - seen)
  if unknown:
    raise ValueError(f"LoRA adapters for paths not in params: {unknown[:4]}.")
  return merged


def num_params(tree) -> int:
  """Number of scalars in a tree (e.g. to report the trainable count)."""
  return sum(int(math.prod(jnp.shape(x))) for x in jax.tree.leaves(tree))
