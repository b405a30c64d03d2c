"""A GPT-style decoder in plain jax.numpy, sized for the benchmarks.

Pre-LayerNorm blocks (causal self-attention, GELU MLP), learned positions and
a head tied to the token embedding; next-token cross-entropy loss. Every
weight is its own leaf, so HiZOO-L factors each matrix. Random init is all
the benchmarks need.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Config:
  """Model and batch sizes."""

  vocab: int
  dim: int
  layers: int
  heads: int
  seq: int
  batch: int

  @property
  def num_params(self) -> int:
    per_layer = 12 * self.dim**2 + 13 * self.dim  # qkv, proj, fc1, fc2, norms.
    return self.vocab * self.dim + self.seq * self.dim + self.layers * per_layer + 2 * self.dim


# About 25M, 100M and 350M parameters (float32).
SIZES = {
    "25M": Config(vocab=8192, dim=512, layers=6, heads=8, seq=128, batch=16),
    "100M": Config(vocab=16384, dim=768, layers=12, heads=12, seq=128, batch=16),
    "350M": Config(vocab=50304, dim=1024, layers=24, heads=16, seq=64, batch=4),
    "tiny": Config(vocab=256, dim=64, layers=2, heads=4, seq=32, batch=4),
}


def init(cfg: Config, key, dtype=jnp.float32):
  """Random parameters: a dict of leaves (a list of per-layer dicts)."""
  keys = iter(jax.random.split(key, 4 + 4 * cfg.layers))

  def normal(shape, scale):
    return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

  d = cfg.dim
  params = {
      "embed": normal((cfg.vocab, d), 0.02),
      "pos": normal((cfg.seq, d), 0.01),
      "norm": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
      "blocks": [],
  }
  out_scale = 0.02 / np.sqrt(2 * cfg.layers)
  for _ in range(cfg.layers):
    params["blocks"].append({
        "norm1": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
        "qkv": normal((d, 3 * d), 0.02),
        "qkv_bias": jnp.zeros((3 * d,), dtype),
        "proj": normal((d, d), out_scale),
        "proj_bias": jnp.zeros((d,), dtype),
        "norm2": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
        "fc1": normal((d, 4 * d), 0.02),
        "fc1_bias": jnp.zeros((4 * d,), dtype),
        "fc2": normal((4 * d, d), out_scale),
        "fc2_bias": jnp.zeros((d,), dtype),
    })
  return params


def make_batch(cfg: Config, seed: int = 0):
  """Random tokens of shape (batch, seq + 1): inputs and shifted targets."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, cfg.vocab, (cfg.batch, cfg.seq + 1)), jnp.int32)


def _layer_norm(x, p):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _attention(x, block, heads):
  b, t, d = x.shape
  qkv = x @ block["qkv"] + block["qkv_bias"]
  q, k, v = jnp.split(qkv.reshape(b, t, 3, heads, d // heads), 3, axis=2)
  q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))
  scores = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(d // heads)
  causal = jnp.tril(jnp.ones((t, t), bool))
  scores = jnp.where(causal, scores, -1e9)
  out = jax.nn.softmax(scores, axis=-1) @ v
  out = out.transpose(0, 2, 1, 3).reshape(b, t, d)
  return out @ block["proj"] + block["proj_bias"]


def make_loss(cfg: Config):
  """``loss(params, tokens)``: mean next-token cross-entropy, float32."""

  def loss(params, tokens):
    p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    x = p["embed"][inputs] + p["pos"][None, : inputs.shape[1]]
    for block in p["blocks"]:
      x = x + _attention(_layer_norm(x, block["norm1"]), block, cfg.heads)
      h = _layer_norm(x, block["norm2"])
      h = jax.nn.gelu(h @ block["fc1"] + block["fc1_bias"])
      x = x + h @ block["fc2"] + block["fc2_bias"]
    logits = _layer_norm(x, p["norm"]) @ p["embed"].T
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

  return loss
