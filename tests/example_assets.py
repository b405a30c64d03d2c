"""Tiny models and a tiny TSV folder for examples/finetune.py: used by
tests/test_example.py and by benchmarks/checkpoint_attacks.py (which kills
the example).

The tiny BERT (``embed``) is written as the example reads all-MiniLM-L6-v2:
config.json, model.safetensors with PyTorch names and tokenizer.json, with
no transformers. The ``mlm`` and ``causal`` models use transformers' Flax
classes and are written only where transformers has them (up to 4.57).
"""

import json
import os
import pathlib
import shutil
import sys

import jax
import numpy as np

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
import _bert  # pylint: disable=g-import-not-at-top,wrong-import-position


def hf_flax():
  """transformers, if it has its Flax classes (up to 4.57), else None."""
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return transformers if hasattr(transformers, "FlaxBertModel") else None


transformers = hf_flax()

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "it", "was", "great",
         "terrible", ".", "a", "the", "movie", "film", "very", "not", "good",
         "bad", "fun", "boring", "awful", "lovely", "plot", "and"]
POS = ["a very good movie", "lovely and fun", "the film was great",
       "good plot", "a lovely film", "great fun", "very good and fun"]
NEG = ["a very bad movie", "boring and awful", "the film was terrible",
       "bad plot", "an awful film", "not fun", "very boring and bad"]
BERT = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


def write_tsv(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.write("sentence\tlabel\n")
    for text, label in rows:
      f.write(f"{text}\t{label}\n")


def _write_tokenizer(folder, vocab):
  """A BERT WordPiece tokenizer.json, built with the tokenizers package."""
  from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel
  from tokenizers.models import WordPiece  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(WordPiece(str(vocab), unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.save(str(folder / "tokenizer.json"))


def _write_bert(folder, vocab):
  """A random tiny BERT in the files of all-MiniLM-L6-v2 (no transformers):
  weights as BERT initialises them (normal, std 0.02; LayerNorm scale 1,
  biases 0), PyTorch names and (out, in) layouts."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  folder.mkdir()
  config = _bert.BertConfig(**BERT)
  rng = np.random.default_rng(0)
  shapes = _bert_shapes(config)
  tensors = {}
  for name, shape in shapes.items():
    if name.endswith("LayerNorm.weight"):
      tensors[name] = np.ones(shape, np.float32)
    elif name.endswith(".bias"):
      tensors[name] = np.zeros(shape, np.float32)
    else:
      tensors[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
  # metadata as PyTorch writes it (transformers checks it when it reads).
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  (folder / "config.json").write_text(json.dumps(
      {"model_type": "bert", "architectures": ["BertModel"],
       "hidden_act": "gelu", "layer_norm_eps": 1e-12, "type_vocab_size": 2,
       **BERT}))
  _write_tokenizer(folder, vocab)
  shutil.copy(vocab, folder / "vocab.txt")


def _bert_shapes(config):
  """HF tensor name -> its shape, from the encoder's own parameter shapes."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  abstract = nnx.eval_shape(lambda: _bert.BertEncoder(config, nnx.Rngs(0)))
  pure = nnx.to_pure_dict(nnx.state(abstract))
  shapes = {}
  for name, (ours, transpose) in _bert.hf_names(config).items():
    node = pure
    for part in ours.split("/"):
      node = node[part]
    shapes[name] = node.shape[::-1] if transpose else node.shape
  return shapes


def _random_params(model):
  """Weights drawn as BERT and GPT-2 initialise them from the shapes alone:
  compiling the model's init_weights took about 3 s per tiny model."""
  shapes = jax.eval_shape(lambda key: model.init_weights(key, (1, 8)),
                          jax.random.key(0))
  rng = np.random.default_rng(0)

  def leaf(path, shape):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(shape.shape, shape.dtype)
    if name.endswith("['bias']"):
      return np.zeros(shape.shape, shape.dtype)
    return (0.02 * rng.standard_normal(shape.shape)).astype(shape.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _write_hf_flax(root, vocab, models):
  """The tiny ``mlm`` (BERT) and ``causal`` (GPT-2) HF Flax models."""
  tok = transformers.BertTokenizerFast(str(vocab))
  transformers.logging.set_verbosity_error()
  bert = transformers.BertConfig(**BERT)
  gpt = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=1,
                                n_head=2, n_positions=64)
  for name, cls, config in [
      ("mlm", transformers.FlaxBertForMaskedLM, bert),
      ("causal", transformers.FlaxGPT2LMHeadModel, gpt)]:
    folder = root / name
    model = cls(config, _do_init=False)
    model.save_pretrained(folder, params=_random_params(model))
    tok.save_pretrained(folder)
    models[name] = str(folder)



def tiny_assets(root) -> dict:
  """Tiny models (embed; mlm, causal where transformers has Flax classes)
  sharing a WordPiece vocab, and a data folder, written under ``root``."""
  root = pathlib.Path(root)
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(WORDS) + "\n")
  _write_bert(root / "embed", vocab)
  models = {"embed": str(root / "embed")}
  if transformers is not None:
    _write_hf_flax(root, vocab, models)
  data = root / "data"
  data.mkdir(exist_ok=True)
  rows = [(t, 1) for t in POS] + [(t, 0) for t in NEG]
  write_tsv(data / "train.tsv", rows * 3)
  write_tsv(data / "dev.tsv", rows)
  write_tsv(data / "test.tsv", rows)
  return {"models": models, "data": str(data), "root": root}
