"""What a user pays for a step, compilation included, in a fresh process.

    python benchmarks/bench_program.py                          # every model
    python benchmarks/bench_program.py --models opt:tiny,decoder:25M --steps 2
    python benchmarks/bench_program.py --models opt:1.3b --dtype bfloat16

For every model and mode (``forward``, ``mezo``, ``hizoo``, ``hizoo_l``: the
lean step ``hz.make_train_step`` with the aliases of ``common.ZO``, via
``common.mode_fn``) the parent starts a fresh Python process with the
persistent compilation cache off, so the child traces, compiles and runs the
step as a user's first run does. The child:

1. Builds the model, its batch and the optimizer state and blocks on them
   (``build_s``; ``build_peak_mib`` = VmHWM so far, init included), returns
   freed heap to the system (``malloc_trim``) and reads VmRSS:
   ``rss_model_mib`` (interpreter, libraries, parameters, state and batch).
2. Resets VmHWM (``/proc/self/clear_refs``), then times ``fn.lower(...)``
   (trace + lower, ``lower_s``), ``.compile()`` (``compile_s``) and the first
   execution of the compiled step (``first_run_s``), each with
   ``time.perf_counter()`` and ``block_until_ready``. ``first_call_s`` is
   their sum: the same three stages the first ``fn(params, state, batch)``
   runs. ``peak_mib`` is VmHWM after the first execution, so
   ``peak_over_model_mib`` = peak - rss_model covers compiling and one step
   (the model build's own peak is ``build_peak_mib``, left out).
3. Trims the heap, resets VmHWM and runs ``--steps`` timed steps (the first
   execution was the warm-up), feeding the donated parameters and state back
   (``common.Runner``): ``step_s`` is their median,
   ``steady_peak_over_model_mib`` the VmHWM over them minus rss_model (the
   loaded program stays resident, so it is included).
4. Last, so its text does not count in the peaks: ``common.memory`` of the
   compiled step (``memory_analysis()`` sizes and ``hlo_instructions``, the
   lines of ``as_text()`` with " = ").

Models (``--models``): ``decoder:25M``, ``decoder:100M``, ``decoder:350M``
(``model.py``, its batches) and ``opt:125m`` (batch 16 x 128),
``opt:1.3b``, ``opt:2.7b``, ``opt:6.7b`` (4 x 64), ``opt:tiny`` (smoke test,
4 x 32): transformers' Flax OPT built offline from an ``OPTConfig``. Random init leaf by leaf with OPT's scheme
(shapes from ``jax.eval_shape(init_weights)``, one small jitted draw per
weight): the build peaks at 1.05x the parameters at 1.3B (36 s), where one
jitted ``init_weights`` holds ~1.8x the parameters in temporaries. Loss: mean
token cross-entropy of ``logits[:, :-1]`` against ``ids[:, 1:]`` in float32
(log-sum-exp minus the target logit, written so that no second logits-sized
array is stored), no dropout. ``--dtype bfloat16``
stores the parameters in bfloat16 and computes in bfloat16 (the loss in
float32), and labels the model ``<model>/bf16``; ``--batch BxT`` overrides
the batch and appends ``@BxT``.

A child that fails or times out is recorded with its stderr tail. Results go
to ``benchmarks/results/<--out>.{json,md}``, saved after every mode; pairs
already in the JSON (errors included) are skipped unless ``--rerun``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import common

MODES = ["forward", "mezo", "hizoo", "hizoo_l"]
MODELS = ["decoder:25M", "decoder:100M", "decoder:350M", "opt:125m", "opt:1.3b"]

# OPT sizes: hidden, layers, ffn, heads, vocab, max positions, (batch, tokens).
OPT = {
    "125m": (768, 12, 3072, 12, 50272, 2048, (16, 128)),
    "1.3b": (2048, 24, 8192, 32, 50272, 2048, (4, 64)),
    "2.7b": (2560, 32, 10240, 32, 50272, 2048, (4, 64)),
    "6.7b": (4096, 32, 16384, 32, 50272, 2048, (4, 64)),
    "tiny": (64, 2, 128, 4, 1000, 256, (4, 32)),
}

# The OPT-125M figures: the official PyTorch code, fp32, 2 threads,
# batch 16 x 128; peak RSS over the built model (MiB) and step time (ms).
PYTORCH_125M = {"forward": (None, 3553), "mezo": (1383, 10454),
                "hizoo": (2167, 19496)}


def build_opt(name: str, dtype, batch):
  """``(params, tokens, loss_fn)`` for a randomly initialised Flax OPT."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  from transformers import FlaxOPTForCausalLM, OPTConfig

  from hizoo_jax import _xla
  hidden, layers, ffn, heads, vocab, positions, default = OPT[name]
  config = OPTConfig(
      hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
      num_attention_heads=heads, vocab_size=vocab,
      max_position_embeddings=positions, word_embed_proj_dim=hidden)
  # bf16 parameters compute in bf16: a float32 module would convert every
  # weight up front (at 6.7B, a 26.6 GB float32 copy).
  model = FlaxOPTForCausalLM(config, dtype=dtype, _do_init=False)
  module = model.module
  # One jitted init_weights holds ~1.8x the parameters in temporaries (the
  # threefry draws of every leaf at once); leaf by leaf, OPT's own scheme
  # (normal(init_std) weights, zero biases, unit norm scales) needs one leaf.
  shapes = jax.eval_shape(
      functools.partial(model.init_weights, input_shape=(1, 1)),
      jax.random.PRNGKey(0))
  normal = jax.jit(
      lambda key, shape: (config.init_std * jax.random.normal(
          key, shape, jnp.float32)).astype(dtype), static_argnums=1)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  key = jax.random.PRNGKey(0)
  params = jax.tree_util.tree_unflatten(treedef, [
      jnp.ones(s.shape, dtype) if path[-1].key == "scale" else
      jnp.zeros(s.shape, dtype) if path[-1].key == "bias" else
      normal(jax.random.fold_in(key, i), s.shape)
      for i, (path, s) in enumerate(leaves)])
  b, t = batch or default
  tokens = jnp.asarray(
      np.random.default_rng(0).integers(0, vocab, (b, t)), jnp.int32)

  def loss(params, ids):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits = module.apply({"params": params}, ids, jnp.ones_like(ids),
                          positions, deterministic=True, return_dict=False)[0]
    # log-sum-exp minus the target's logit, reading the logits where they
    # are: log_softmax, a slice logits[:, :-1], or a one-output sum of exp
    # (which XLA:CPU hands to YNNPACK with its operand stored) would each
    # hold a second logits-sized array (393 MiB at OPT-125M).
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    total = _xla.fused_sum(jnp.exp(logits - top), (2,))  # exp not stored
    nll = (jnp.log(total) + top - jnp.take_along_axis(
        logits, jnp.roll(ids, -1, axis=1)[..., None], -1))[..., 0]
    return jnp.mean(nll[:, :-1])  # the last position has no next token

  return params, tokens, loss


def build(spec: str, dtype_name: str, batch):
  """``(params, batch, loss_fn, (batch, tokens))`` for a model spec."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import model as model_lib
  dtype = jnp.dtype(dtype_name)
  family, name = spec.split(":")
  if family == "opt":
    params, tokens, loss = build_opt(name, dtype, batch)
    return params, tokens, loss, tuple(tokens.shape)
  if family != "decoder":
    raise ValueError(f"unknown model {spec!r}")
  cfg = model_lib.SIZES[name]  # As common.build, with the overrides.
  if batch:
    cfg = dataclasses.replace(cfg, batch=batch[0], seq=batch[1])
  params = model_lib.init(cfg, jax.random.key(0), dtype)
  return (params, model_lib.make_batch(cfg), model_lib.make_loss(cfg),
          (cfg.batch, cfg.seq))


def child(spec: str, mode: str, steps: int, dtype: str, batch) -> None:
  """Runs in a fresh process; prints one JSON line (see the module doc)."""
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  mib = lambda field: common.status_kib(field) / 1024  # noqa: E731
  rss_start = mib("VmRSS")
  start = time.perf_counter()
  params, tokens, loss_fn, shape = build(spec, dtype, batch)
  fn, make_state = common.mode_fn(mode, loss_fn)
  state = make_state(params)
  jax.block_until_ready((params, state, tokens))
  build_s = time.perf_counter() - start
  build_peak = mib("VmHWM")
  leaves = jax.tree.leaves(params)
  info = {"params": sum(a.size for a in leaves), "leaves": len(leaves),
          "batch": list(shape), "dtype": str(leaves[0].dtype)}
  common.trim_heap()
  rss_model = mib("VmRSS")
  reset = common.reset_peak()

  start = time.perf_counter()
  lowered = fn.lower(params, state, tokens)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  del lowered
  pool = {"params": params, common.state_group(mode): state}
  del params, state  # Donated: the pool holds the live ones.
  runner = common.Runner(compiled, pool, mode, tokens)
  first_run_s = runner.call()
  peak = mib("VmHWM")

  common.trim_heap()
  rss_after_first = mib("VmRSS")
  common.reset_peak()
  times = [runner.call() for _ in range(steps)]
  steady_peak = mib("VmHWM")
  analysis = common.memory(compiled)
  print(json.dumps({
      **info, "hlo_instructions": analysis.pop("hlo_instructions"),
      "memory_analysis_mib": analysis,
      "build_s": build_s, "lower_s": lower_s, "compile_s": compile_s,
      "first_run_s": first_run_s,
      "first_call_s": lower_s + compile_s + first_run_s,
      "step_s": statistics.median(times), "steps_s": times,
      "rss_start_mib": rss_start, "build_peak_mib": build_peak,
      "rss_model_mib": rss_model, "peak_mib": peak,
      "peak_over_model_mib": peak - rss_model,
      "rss_after_first_mib": rss_after_first,
      "steady_peak_mib": steady_peak,
      "steady_peak_over_model_mib": steady_peak - rss_model,
      "peak_reset": reset}))


def _tail(text, chars: int = 3000) -> str:
  if isinstance(text, bytes):
    text = text.decode(errors="replace")
  return (text or "")[-chars:]


def run_child(spec: str, mode: str, args) -> dict:
  """One (model, mode) in a fresh process; an error row if it fails."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", mode,
         "--models", spec, "--steps", str(args.steps), "--dtype", args.dtype]
  if args.batch:
    cmd += ["--batch", args.batch]
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  start = time.perf_counter()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         timeout=args.timeout)
  except subprocess.TimeoutExpired as e:
    return {"error": f"timed out after {args.timeout} s",
            "stderr_tail": _tail(e.stderr)}
  wall = time.perf_counter() - start
  if out.returncode != 0:
    why = (f"killed by signal {-out.returncode} (out of memory?)"
           if out.returncode < 0 else f"exit code {out.returncode}")
    return {"error": why, "stderr_tail": _tail(out.stderr), "wall_s": wall}
  row = json.loads(out.stdout.strip().splitlines()[-1])
  row["wall_s"] = wall
  row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  return row


def _ratio(a, b, fmt=".2f") -> str:
  return format(a / b, fmt) if a is not None and b and b > 0 else ""


def table(results: dict) -> str:
  lines = [
      "| model | mode | batch | params (M) | leaves | HLO instructions "
      "| instr. / forward's | first call (s) | first call / forward's "
      "| peak incl. compile over model (MiB) | steady peak over model (MiB) "
      "| steady / forward's | step (s) | step / forward step |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
      "| --- | --- | --- |"]
  for label, modes in results["models"].items():
    fwd = modes.get("forward", {})
    for mode, r in modes.items():
      if "error" in r:
        lines.append(f"| {label} | {mode} | error: {r['error']} |"
                     + " |" * 11)
        continue
      g = lambda key: fwd.get(key)  # noqa: E731
      lines.append("| " + " | ".join([
          label, mode, "x".join(map(str, r["batch"])),
          f"{r['params'] / 1e6:.1f}", str(r["leaves"]),
          str(r["hlo_instructions"]),
          _ratio(r["hlo_instructions"], g("hlo_instructions"), ".1f"),
          f"{r['first_call_s']:.1f}",
          _ratio(r["first_call_s"], g("first_call_s")),
          f"{r['peak_over_model_mib']:.0f}",
          f"{r['steady_peak_over_model_mib']:.0f}",
          _ratio(r["steady_peak_over_model_mib"],
                 g("steady_peak_over_model_mib")),
          f"{r['step_s']:.3f}", _ratio(r["step_s"], g("step_s"))]) + " |")
  ours = results["models"].get("opt:125m", {})
  lines += [
      "", "OPT-125M against the issue's PyTorch figures (official code, fp32, "
      "2 threads, batch 16 x 128; peak RSS over the built model):", "",
      "| mode | PyTorch peak over model (MiB) | ours, peak incl. compile over "
      "model (MiB) | ours / PyTorch | PyTorch step (ms) | PyTorch step / "
      "forward | ours step (ms) | ours step / forward |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for mode, (peak, step) in PYTORCH_125M.items():
    r = ours.get(mode, {})
    our_peak, our_step = r.get("peak_over_model_mib"), r.get("step_s")
    our_fwd = ours.get("forward", {}).get("step_s")
    lines.append("| " + " | ".join([
        mode, str(peak or ""),
        f"{our_peak:.0f}" if our_peak is not None else "",
        _ratio(our_peak, peak), str(step),
        _ratio(step, PYTORCH_125M["forward"][1]),
        f"{our_step * 1e3:.0f}" if our_step is not None else "",
        _ratio(our_step, our_fwd)]) + " |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--steps", type=int, default=3,
                      help="timed steps after the first call")
  parser.add_argument("--batch", default=None, help="BxT, e.g. 8x64")
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--timeout", type=float, default=3600,
                      help="seconds per child process")
  parser.add_argument("--out", default="program")
  parser.add_argument("--rerun", action="store_true",
                      help="redo pairs already in the JSON")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  batch = tuple(map(int, args.batch.lower().split("x"))) if args.batch else None
  if args.child:
    child(args.models, args.child, args.steps, args.dtype, batch)
    return
  path = os.path.join(common.RESULTS, f"{args.out}.json")
  results = {"models": {}}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  results["environment"] = common.environment()
  suffix = ("/bf16" if args.dtype == "bfloat16" else "") + (
      f"@{args.batch}" if args.batch else "")
  for spec in args.models.split(","):
    label = spec + suffix
    rows = results["models"].setdefault(label, {})
    for mode in args.modes.split(","):
      if mode in rows and not args.rerun:
        print(f"{label} {mode}: in {path}, skipped", flush=True)
        continue
      print(f"{label} {mode}: running", flush=True)
      rows[mode] = row = run_child(spec, mode, args)
      if "error" in row:
        print(f"{label} {mode}: ERROR {row['error']}\n{row['stderr_tail']}",
              flush=True)
      else:
        print(f"{label} {mode}: {row['hlo_instructions']} instructions, "
              f"first call {row['first_call_s']:.1f} s (compile "
              f"{row['compile_s']:.1f} s), peak over model "
              f"{row['peak_over_model_mib']:.0f} MiB, steady "
              f"{row['steady_peak_over_model_mib']:.0f} MiB, step "
              f"{row['step_s']:.3f} s", flush=True)
      common.save(args.out, results, table(results), echo=False)
  print(table(results), flush=True)


if __name__ == "__main__":
  main()
