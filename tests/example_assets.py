"""Tiny HF Flax models (BERT embed/MLM, GPT-2) and a tiny TSV folder for
examples/finetune.py: used by tests/test_example.py and by
benchmarks/checkpoint_attacks.py (which kills the example)."""

import os

import jax
import numpy as np
import transformers

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "it", "was", "great",
         "terrible", ".", "a", "the", "movie", "film", "very", "not", "good",
         "bad", "fun", "boring", "awful", "lovely", "plot", "and"]
POS = ["a very good movie", "lovely and fun", "the film was great",
       "good plot", "a lovely film", "great fun", "very good and fun"]
NEG = ["a very bad movie", "boring and awful", "the film was terrible",
       "bad plot", "an awful film", "not fun", "very boring and bad"]


def write_tsv(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.write("sentence\tlabel\n")
    for text, label in rows:
      f.write(f"{text}\t{label}\n")


def _random_params(model):
  """Weights drawn as BERT and GPT-2 initialise them (normal, std 0.02;
  LayerNorm scale 1, biases 0) from the shapes alone: compiling the model's
  init_weights took about 3 s per tiny model."""
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


def tiny_assets(root) -> dict:
  """Tiny models (embed, mlm, causal) sharing a WordPiece vocab + data,
  written under ``root``; returns their paths."""
  root = os.fspath(root)
  vocab = os.path.join(root, "vocab.txt")
  with open(vocab, "w") as f:
    f.write("\n".join(WORDS) + "\n")
  tok = transformers.BertTokenizerFast(vocab)
  transformers.logging.set_verbosity_error()
  bert = transformers.BertConfig(
      vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=64,
      max_position_embeddings=64)
  gpt = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=1,
                                n_head=2, n_positions=64)
  models = {}
  for name, cls, config in [
      ("embed", transformers.FlaxBertModel, bert),
      ("mlm", transformers.FlaxBertForMaskedLM, bert),
      ("causal", transformers.FlaxGPT2LMHeadModel, gpt)]:
    folder = os.path.join(root, name)
    model = cls(config, _do_init=False)
    model.save_pretrained(folder, params=_random_params(model))
    tok.save_pretrained(folder)
    models[name] = folder
  data = os.path.join(root, "data")
  os.makedirs(data, exist_ok=True)
  rows = [(t, 1) for t in POS] + [(t, 0) for t in NEG]
  write_tsv(os.path.join(data, "train.tsv"), rows * 3)
  write_tsv(os.path.join(data, "dev.tsv"), rows)
  write_tsv(os.path.join(data, "test.tsv"), rows)
  return {"models": models, "data": data, "root": root}
