"""The k-shot SST-2 task on MiniLM that the curvature studies share.

The example's pieces (``examples/_data.py``, ``examples/_model.py``):
all-MiniLM-L6-v2 scoring the label words "terrible" / "great", k examples
per class drawn from GLUE train by a data seed.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "examples"))
import _data  # noqa: E402
import _model  # noqa: E402

LABEL_WORDS = ["terrible", "great"]
DATA_DIR = os.path.join(HERE, "..", "..", "..", "shared", "data", "SST-2")


def add_task_args(parser) -> None:
  """The task's options: ``--data-dir``, ``--k``, ``--max-length``."""
  parser.add_argument("--data-dir", default=DATA_DIR,
                      help="GLUE SST-2 as TSV (train.tsv, dev.tsv, test.tsv)")
  parser.add_argument("--k", type=int, default=16, help="examples per class")
  parser.add_argument("--max-length", type=int, default=48,
                      help="tokens per sentence")


def require_data(data_dir: str) -> None:
  """Exits with a clear message where the SST-2 folder is missing."""
  if not os.path.isdir(data_dir):
    sys.exit(f"no SST-2 data in {data_dir}: pass --data-dir.")


def load_model():
  """The classifier: ``clf.params`` (the encoder) and ``clf.head``."""
  return _model.load(_model.DEFAULT_MODEL, "embed", LABEL_WORDS)


def train_batch(clf, data_dir: str, k: int, seed: int, max_length: int):
  """``(batch, pool, test)``: the k-shot training set of data seed ``seed``
  encoded with its labels, the rest of GLUE train, and the test set."""
  pool, test = _data.load_tsv_dir(data_dir)
  train_set = _data.sample_k_shot(pool, k, seed)
  batch = clf.encode(train_set.texts, max_length)
  batch["labels"] = train_set.labels
  return batch, pool, test


def loss_fn(clf):
  """``loss(train, batch)``: cross-entropy of the label words, ``train``
  holding ``"model"`` and ``"head"``."""
  objective = _model.objective_fn("loss")

  def loss(train, batch):
    return objective(clf.logits(train["model"], train["head"], batch),
                     batch["labels"])
  return loss
