"""A BERT encoder in Flax NNX, read from a Hugging Face folder without transformers.

The default model of examples/finetune.py (all-MiniLM-L6-v2) is a BERT
encoder; this module holds everything the example needs to run it:
  * :class:`BertEncoder`, BERT's encoder (embeddings, post-LayerNorm
    transformer layers, exact GELU) returning the last hidden states;
  * :func:`load`, which reads ``config.json`` and ``model.safetensors`` (the
    PyTorch names and layouts) and ``tokenizer.json`` (with the
    ``tokenizers`` package);
  * :class:`FunctionalBert` and :class:`WordPieceTokenizer`: the call and
    tokenizer interface of transformers' Flax models that
    examples/_model.py uses, so one classifier serves both.

The parameters are handed out as a plain nested dict (``nnx.State``'s pure
dict) so that hz.lora and checkpoints see ordinary paths, e.g.
``layers/0/query/kernel``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT ``config.json`` that the encoder uses."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    if raw.get("model_type") != "bert":
      raise ValueError(f"{path}: model_type {raw.get('model_type')!r}, not "
                       "'bert'.")
    if raw.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r}; this "
                       "encoder implements BERT's exact 'gelu' only.")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


class Layer(nnx.Module):
  """One post-LayerNorm transformer layer."""

  def __init__(self, c: BertConfig, rngs: nnx.Rngs):
    h, eps = c.hidden_size, c.layer_norm_eps
    self.heads = c.num_attention_heads
    self.query = nnx.Linear(h, h, rngs=rngs)
    self.key = nnx.Linear(h, h, rngs=rngs)
    self.value = nnx.Linear(h, h, rngs=rngs)
    self.attn_out = nnx.Linear(h, h, rngs=rngs)
    self.attn_norm = nnx.LayerNorm(h, epsilon=eps, rngs=rngs)
    self.ffn_in = nnx.Linear(h, c.intermediate_size, rngs=rngs)
    self.ffn_out = nnx.Linear(c.intermediate_size, h, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(h, epsilon=eps, rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    b, t, h = x.shape
    split = lambda y: y.reshape(b, t, self.heads, h // self.heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(h // self.heads)
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1)
    context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)
    x = self.attn_norm(x + self.attn_out(context.reshape(b, t, h)))
    ffn = self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False))
    return self.ffn_norm(x + ffn)


class BertEncoder(nnx.Module):
  """BERT's encoder: ``(ids, mask) -> (batch, length, hidden)`` states."""

  def __init__(self, c: BertConfig, rngs: nnx.Rngs):
    h = c.hidden_size
    self.word = nnx.Embed(c.vocab_size, h, rngs=rngs)
    self.position = nnx.Embed(c.max_position_embeddings, h, rngs=rngs)
    self.token_type = nnx.Embed(c.type_vocab_size, h, rngs=rngs)
    self.embed_norm = nnx.LayerNorm(h, epsilon=c.layer_norm_eps, rngs=rngs)
    self.layers = nnx.Dict({str(i): Layer(c, rngs)
                            for i in range(c.num_hidden_layers)})

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    positions = jnp.arange(ids.shape[1])[None]
    x = self.embed_norm(self.word(ids) + self.position(positions)
                        + self.token_type(jnp.zeros_like(ids)))
    # Padded keys get a large negative score (as transformers does).
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0,
                     jnp.finfo(jnp.float32).min)
    for i in range(len(self.layers)):
      x = self.layers[str(i)](x, bias)
    return x


def hf_names(c: BertConfig) -> dict:
  """``{HF tensor name: (our pure-dict path, transpose)}`` for every weight."""
  names = {
      "embeddings.word_embeddings.weight": ("word/embedding", False),
      "embeddings.position_embeddings.weight": ("position/embedding", False),
      "embeddings.token_type_embeddings.weight": ("token_type/embedding",
                                                  False),
      "embeddings.LayerNorm.weight": ("embed_norm/scale", False),
      "embeddings.LayerNorm.bias": ("embed_norm/bias", False),
  }
  parts = {"attention.self.query": "query", "attention.self.key": "key",
           "attention.self.value": "value", "attention.output.dense":
           "attn_out", "intermediate.dense": "ffn_in", "output.dense":
           "ffn_out"}
  norms = {"attention.output.LayerNorm": "attn_norm",
           "output.LayerNorm": "ffn_norm"}
  for i in range(c.num_hidden_layers):
    for hf, ours in parts.items():
      # PyTorch's Linear keeps (out, in); a Flax kernel is (in, out).
      names[f"encoder.layer.{i}.{hf}.weight"] = (f"layers/{i}/{ours}/kernel",
                                                 True)
      names[f"encoder.layer.{i}.{hf}.bias"] = (f"layers/{i}/{ours}/bias",
                                               False)
    for hf, ours in norms.items():
      names[f"encoder.layer.{i}.{hf}.weight"] = (f"layers/{i}/{ours}/scale",
                                                 False)
      names[f"encoder.layer.{i}.{hf}.bias"] = (f"layers/{i}/{ours}/bias",
                                               False)
  return names


def _set(tree: dict, path: str, value) -> None:
  *parents, last = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[last] = value


def load_params(path: str, config: BertConfig) -> tuple[Any, dict]:
  """(graphdef, params) of the encoder with the weights of ``path``.

  Raises:
    ValueError: a weight is missing or has another shape than the config
      gives (a folder of another architecture).
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  abstract = nnx.eval_shape(lambda: BertEncoder(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shapes = {jax.tree_util.keystr(p, simple=True, separator="/"): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(
                nnx.to_pure_dict(state))[0]}
  tensors = load_file(path)
  # Checkpoints saved as BertForMaskedLM etc. prefix the names with "bert.".
  tensors = {k[len("bert."):] if k.startswith("bert.") else k: v
             for k, v in tensors.items()}
  params: dict = {}
  for name, (ours, transpose) in hf_names(config).items():
    if name not in tensors:
      raise ValueError(f"{path} has no tensor {name!r}: not a BERT encoder "
                       "of this config.")
    value = tensors[name].T if transpose else tensors[name]
    if value.shape != shapes[ours]:
      raise ValueError(f"{path}: {name} has shape {tensors[name].shape}, the "
                       f"config gives {shapes[ours]}.")
    _set(params, ours, jnp.asarray(value, jnp.float32))
  return graphdef, params


class FunctionalBert:
  """``model(ids, attention_mask=, params=, train=)`` as transformers' Flax
  models are called, returning an object with ``last_hidden_state``."""

  def __init__(self, graphdef, config: BertConfig):
    self.graphdef = graphdef
    self.config = config

  def __call__(self, input_ids, attention_mask=None, params=None,
               train: bool = False):
    del train  # No dropout: the example's ZO steps evaluate deterministically.
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    model = nnx.merge(self.graphdef, nnx.State(params))
    return types.SimpleNamespace(
        last_hidden_state=model(jnp.asarray(input_ids),
                                jnp.asarray(attention_mask)))


class WordPieceTokenizer:
  """The few calls of a transformers BERT tokenizer that _model.py makes,
  over a ``tokenizers.Tokenizer`` read from ``tokenizer.json``."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    self.tok = Tokenizer.from_file(path)
    self.tok.no_truncation()  # MiniLM's file pads and truncates to 128.
    self.tok.no_padding()
    ids = {t: self.tok.token_to_id(t)
           for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")}
    missing = [t for t, i in ids.items() if i is None and t != "[MASK]"]
    if missing:
      raise ValueError(f"{path}: no {missing} token: not a BERT WordPiece "
                       "tokenizer.")
    self.cls_token_id, self.sep_token_id = ids["[CLS]"], ids["[SEP]"]
    self.pad_token_id, self.unk_token_id = ids["[PAD]"], ids["[UNK]"]
    self.mask_token, self.mask_token_id = "[MASK]", ids["[MASK]"]
    self.all_special_ids = [i for i in ids.values() if i is not None]

  def __call__(self, texts, add_special_tokens: bool = True) -> dict:
    single = isinstance(texts, str)
    encs = self.tok.encode_batch([texts] if single else list(texts),
                                 add_special_tokens=add_special_tokens)
    ids = [e.ids for e in encs]
    return {"input_ids": ids[0] if single else ids}

  def num_special_tokens_to_add(self, pair: bool = False) -> int:
    return 3 if pair else 2

  def build_inputs_with_special_tokens(self, ids) -> list:
    return [self.cls_token_id, *ids, self.sep_token_id]


def is_bert_folder(path: str) -> bool:
  """Whether ``path`` is a local BERT folder this module can read."""
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      model_type = json.load(f).get("model_type")
  except (OSError, ValueError):
    return False
  return model_type == "bert" and all(
      os.path.isfile(os.path.join(path, f))
      for f in ("model.safetensors", "tokenizer.json"))


def load(path: str) -> tuple[FunctionalBert, WordPieceTokenizer, dict]:
  """(model, tokenizer, params) from a local BERT folder (see is_bert_folder)."""
  config = BertConfig.from_json(os.path.join(path, "config.json"))
  graphdef, params = load_params(os.path.join(path, "model.safetensors"),
                                 config)
  return (FunctionalBert(graphdef, config),
          WordPieceTokenizer(os.path.join(path, "tokenizer.json")), params)
