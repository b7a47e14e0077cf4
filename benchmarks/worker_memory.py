"""Peak memory of one sweep worker of ``asymlora compare`` and of ``asymlora sft``, and where it goes.

Each worker is measured in a fresh Python process (``--child compare|sft``) that does what a
worker of ``asymlora.sweep.backends.LocalPool`` does: one thread, load the task once
(``prepare_task`` / ``prepare_lm_task``), then run jobs on it. The jobs here are adapter runs
(lora) at the default settings of each command except a shorter step cap (``--max-steps``; the
memory of a step does not depend on how many came before it) and, for compare, the test split
capped, so the numbers take minutes. ``--runs 2`` runs a second job in the same worker (what a
sweep does), to show whether memory stays in the process between jobs.

Measured (Linux, ``/proc/self/status``):

- **baseline**: RSS after the imports a worker needs (torch, transformers, asymlora);
- **task load**: RSS before/after loading the base model (``from_pretrained``) and the rest of
  the task (tokenizer, data, tokenised splits); **base weights** are also counted exactly, as
  the bytes of the model's distinct parameter and buffer storages;
- **one training step**: VmHWM reset (``echo 5 > /proc/self/clear_refs``) just before the
  step, read after it: the step's peak minus the RSS before it is the step's working memory
  (activations saved for backward, the logits, gradients, temporaries); the saved activations
  alone are counted exactly by ``fit``'s ``saved_tensors_hooks`` tracker;
- **optimizer state**: the bytes of the tensors in ``optimizer.state`` after the step;
- **evaluation / scoring**: VmHWM around each evaluation and around the test scoring;
- **held twice**: after the measured step, every tensor of more than 1 MB alive in the
  process (``gc.get_objects()``) grouped by storage: the base model's own storages, the run
  model's storages that are *not* the base's (a copy of frozen weights), the optimizer's, and
  anything else;
- **peak**: the largest VmHWM of all segments (the worker's peak RSS).

Usage::

    PYTHONPATH=src python benchmarks/worker_memory.py --label after
    # writes docs/results/worker-memory/<label>.json and .md
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

MB = 1024 ** 2
OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "worker-memory")


# ----------------------------------------------------------------------------- /proc readings


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss() -> int:
    return _status("VmRSS")


class Peaks:
    """VmHWM read in segments: ``segment(name)`` resets the high-water mark, the block runs,
    and the segment's peak is recorded; ``overall`` is the largest of all (the reset would
    otherwise hide the earlier peaks)."""

    def __init__(self) -> None:
        self.overall = _status("VmHWM")
        self.segments: dict[str, dict[str, int]] = {}

    def _reset(self) -> None:
        self.overall = max(self.overall, _status("VmHWM"))
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def segment(self, name: str):
        peaks = self

        class _Seg:
            def __enter__(self):
                peaks._reset()
                self.before = rss()
                return self

            def __exit__(self, *exc):
                peak = _status("VmHWM")
                peaks.overall = max(peaks.overall, peak)
                old = peaks.segments.get(name)
                rec = {"rss_before": self.before, "peak": peak, "rss_after": rss(),
                       "peak_minus_before": peak - self.before}
                if old is None or rec["peak"] > old["peak"]:
                    peaks.segments[name] = rec
                return False

        return _Seg()

    def final(self) -> int:
        self.overall = max(self.overall, _status("VmHWM"))
        return self.overall


# ----------------------------------------------------------------------------- tensor census


def _storage_key(t: Any) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def storages(module: Any) -> dict[int, int]:
    """data_ptr → bytes of the distinct storages of ``module``'s parameters and buffers."""
    out: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        key = _storage_key(t)
        if key is not None and key[0]:
            out[key[0]] = key[1]
    return out


def live_tensors(min_bytes: int = MB) -> dict[int, dict[str, Any]]:
    """Every distinct storage of more than ``min_bytes`` held by a live Python tensor."""
    import torch

    out: dict[int, dict[str, Any]] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
        except ReferenceError:
            continue
        key = _storage_key(obj)
        if key is None or not key[0] or key[1] < min_bytes or key[0] in out:
            continue
        out[key[0]] = {"bytes": key[1], "dtype": str(obj.dtype).replace("torch.", ""), "shape": list(obj.shape)}
    return out


def census(base: Any, run_model: Any, optimizer: Any) -> dict[str, Any]:
    """Large live tensors grouped by owner (see the module docstring)."""
    base_st, run_st = storages(base), storages(run_model)
    opt_st = {}
    for state in optimizer.state.values():
        for v in state.values():
            key = _storage_key(v) if hasattr(v, "untyped_storage") else None
            if key is not None and key[0]:
                opt_st[key[0]] = key[1]
    groups: dict[str, dict[str, Any]] = {k: {"bytes": 0, "tensors": 0} for k in
                                         ("base model", "run model: copy of base storages", "optimizer state",
                                          "other")}
    others: list[dict[str, Any]] = []
    for ptr, info in live_tensors().items():
        if ptr in base_st:
            g = "base model"
        elif ptr in run_st:
            g = "run model: copy of base storages"
        elif ptr in opt_st:
            g = "optimizer state"
        else:
            g = "other"
            others.append(info)
        groups[g]["bytes"] += info["bytes"]
        groups[g]["tensors"] += 1
    others.sort(key=lambda i: -i["bytes"])
    return {"groups": groups, "largest_other": others[:8],
            "run_model_storages_shared_with_base": sum(1 for p in run_st if p in base_st),
            "run_model_storages": len(run_st), "base_storages": len(base_st)}


# ----------------------------------------------------------------------------- instrumentation of fit


def instrument(peaks: Peaks, state: dict[str, Any], measure_step: int) -> None:
    """Wrap ``fit``'s step, evaluation and run so the segments above are recorded (benchmark only)."""
    from asymlora.training import loop

    run_cls = loop._Run
    orig_step, orig_eval, orig_init = run_cls.train_step, run_cls.evaluate, run_cls.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        state["run"] = self

    def train_step(self):
        step = self.state.step + 1
        if step not in (1, measure_step):
            out = orig_step(self)
            state.setdefault("rss_by_step", []).append(rss())
            return out
        with peaks.segment("first training step" if step == 1 else "training step"):
            out = orig_step(self)
        state.setdefault("rss_by_step", []).append(rss())
        if step != measure_step:
            return out
        opt_bytes = 0
        for st in self.optimizer.state.values():
            for v in st.values():
                if hasattr(v, "nbytes") and hasattr(v, "untyped_storage"):
                    opt_bytes += v.nbytes
        state["optimizer_state_bytes"] = opt_bytes
        state["trainable_bytes"] = sum(p.nbytes for _, p in self.named_trainable)
        state["grad_bytes"] = sum(p.grad.nbytes for _, p in self.named_trainable if p.grad is not None)
        state["saved_activation_bytes"] = self.tracker.peak
        state["census"] = census(state["base"], self.raw, self.optimizer)
        return out

    def evaluate(self):
        with peaks.segment("validation"):
            return orig_eval(self)

    run_cls.__init__, run_cls.train_step, run_cls.evaluate = init, train_step, evaluate


def param_bytes(model: Any) -> int:
    return sum(storages(model).values())


# ----------------------------------------------------------------------------- the two workers


def child_compare(args: argparse.Namespace, peaks: Peaks, out: dict[str, Any]) -> None:
    from dataclasses import replace

    from asymlora.compare import run as compare_run
    from asymlora.compare.config import CompareConfig
    from asymlora.compare.task import prepare_task

    cfg = CompareConfig(workers=1, progress=False, max_steps=args.max_steps or CompareConfig().max_steps)
    cfg = replace(cfg, max_test=args.max_test or cfg.max_test)
    out["settings"] = {"max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                       "eval_every": cfg.eval_every, "max_val": cfg.max_val, "max_test": cfg.max_test,
                       "precision": cfg.mixed_precision, "stopping": cfg.stopping}
    _time_model_load("transformers.AutoModelForSequenceClassification", out)
    with peaks.segment("task load"):
        task = prepare_task(cfg)
    out["base_param_bytes"] = param_bytes(task.base)
    state = {"base": task.base}
    instrument(peaks, state, args.measure_step)
    (spec,) = [s for s in cfg.runs() if s.preset == "lora"]
    for i in range(args.runs):
        res = compare_run.execute_run(task, spec, seed=i, lr=1e-3, cfg=cfg, desc="mem")
        out.setdefault("records", []).append({k: res.record[k] for k in ("test_accuracy", "val_accuracy", "steps",
                                                                          "peak_memory_bytes")})
        del res
        gc.collect()
        _after_run(out, state)
    out["step"] = {k: state[k] for k in ("optimizer_state_bytes", "trainable_bytes", "grad_bytes",
                                         "saved_activation_bytes", "census", "rss_by_step")}


def child_sft(args: argparse.Namespace, peaks: Peaks, out: dict[str, Any]) -> None:
    from asymlora.sft import run as sft_run
    from asymlora.sft.config import SFTConfig

    cfg = SFTConfig(workers=1, progress=False, max_steps=args.max_steps or SFTConfig().max_steps)
    out["settings"] = {"max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                       "eval_every": cfg.eval_every, "max_val": cfg.max_val, "max_test": cfg.max_test,
                       "precision": cfg.mixed_precision, "stopping": cfg.stopping, "target_modules": cfg.target_modules}
    _time_model_load("transformers.AutoModelForCausalLM", out)
    with peaks.segment("task load"):
        task = sft_run.prepare_lm_task(cfg)
    out["base_param_bytes"] = param_bytes(task.lm)
    state = {"base": task.lm}
    instrument(peaks, state, args.measure_step)
    orig_score = sft_run.score_test

    def score_test(*a, **kw):
        with peaks.segment("test scoring (loss + generation)"):
            return orig_score(*a, **kw)

    sft_run.score_test = score_test
    cfg.output_dir = args.tmp
    (spec,) = [s for s in cfg.runs() if s.preset == "lora"]
    for i in range(args.runs):
        rec, _ = sft_run.execute_run(task, spec, seed=i, lr=1e-3, cfg=cfg, desc="mem")
        out.setdefault("records", []).append({k: rec[k] for k in ("val_loss", "test_loss", "test_exact_match",
                                                                  "steps", "peak_memory_bytes")})
        del rec
        gc.collect()
        _after_run(out, state)
    out["step"] = {k: state[k] for k in ("optimizer_state_bytes", "trainable_bytes", "grad_bytes",
                                         "saved_activation_bytes", "census", "rss_by_step")}


def _after_run(out: dict[str, Any], state: dict[str, Any]) -> None:
    """RSS after a run, and after handing the heap's free pages back (what a worker does
    between jobs where ``release_freed_memory`` exists): the difference is memory freed by the
    run but kept by the C allocator."""
    out.setdefault("rss_after_runs", []).append(rss())
    out.setdefault("saved_activation_peak_of_runs", []).append(state["run"].tracker.peak)
    try:
        from asymlora.sweep.backends import release_freed_memory
    except ImportError:  # the code before the fix
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    else:
        release_freed_memory()
    out.setdefault("rss_after_runs_trimmed", []).append(rss())


def _time_model_load(dotted: str, out: dict[str, Any]) -> None:
    """Record RSS before/after the base model's ``from_pretrained`` (the rest of the task
    load is the tokenizer and the data)."""
    import importlib

    mod_name, cls_name = dotted.rsplit(".", 1)
    cls = getattr(importlib.import_module(mod_name), cls_name)
    orig = cls.from_pretrained.__func__

    def from_pretrained(klass, *a, **kw):
        before = rss()
        model = orig(klass, *a, **kw)
        gc.collect()
        out["model_load"] = {"rss_before": before, "rss_after": rss()}
        return model

    cls.from_pretrained = classmethod(from_pretrained)


def child(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    out: dict[str, Any] = {"worker": args.child, "rss_start": rss()}
    import torch  # noqa: F401 - what a worker imports before it loads the task
    import transformers  # noqa: F401

    import asymlora.training.loop  # noqa: F401

    torch.set_num_threads(1)  # a LocalPool worker computes with one thread
    peaks = Peaks()
    out["baseline_after_imports"] = rss()
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        t = time.perf_counter()
        (child_compare if args.child == "compare" else child_sft)(args, peaks, out)
        out["seconds"] = round(time.perf_counter() - t, 1)
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_seconds"] = round(ru.ru_utime + ru.ru_stime, 1)
    out["segments"] = peaks.segments
    out["peak_rss"] = peaks.final()
    return out


# ----------------------------------------------------------------------------- the report


def split(r: dict[str, Any]) -> list[tuple[str, int]]:
    """The peak RSS in parts that add up to it; the last part is what the measured ones leave."""
    step = r["step"]
    task_load = r["segments"]["task load"]
    model_load = r["model_load"]["rss_after"] - r["model_load"]["rss_before"]
    activations = max(r.get("saved_activation_peak_of_runs") or [step["saved_activation_bytes"]])
    parts = [("process baseline after imports", r["baseline_after_imports"]),
             ("base weights (parameter + buffer storages)", r["base_param_bytes"]),
             ("held twice: the run's copy of the base weights",
              step["census"]["groups"]["run model: copy of base storages"]["bytes"]),
             ("tokenizer, data, tokenised splits", task_load["rss_after"] - task_load["rss_before"] - model_load),
             ("trainable weights + optimizer state (AdamW moments)", step["trainable_bytes"]
              + step["optimizer_state_bytes"]),
             ("activations saved for backward (largest step, exact)", activations)]
    parts.append(("step temporaries (weight casts, logits, grads) and freed memory the C heap kept",
                  r["peak_rss"] - sum(v for _, v in parts)))
    return parts


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Worker memory ({results['label']})", "", f"Machine: {results['machine']}.", ""]
    for r in results["workers"]:
        lines += [f"## {r['worker']} worker", "",
                  f"Settings: {json.dumps(r['settings'])}; {r.get('runs', 1)} run(s) in the worker; "
                  f"{r['seconds']:.0f} s ({r.get('cpu_seconds', 0):.0f} CPU s).", "",
                  f"**Peak RSS: {r['peak_rss'] / MB:.0f} MiB**", "", "| part | MiB |", "|---|---:|"]
        lines += [f"| {name} | {v / MB:.0f} |" for name, v in split(r)]
        lines += ["", "Segments (VmHWM reset at the start of each):", "",
                  "| segment | RSS before | peak | peak − before |", "|---|---:|---:|---:|"]
        for name, s in r["segments"].items():
            lines.append(f"| {name} | {s['rss_before'] / MB:.0f} | {s['peak'] / MB:.0f} | "
                         f"{s['peak_minus_before'] / MB:.0f} |")
        step = r["step"]
        lines += ["", f"Saved activations of the measured step (exact): {step['saved_activation_bytes'] / MB:.1f} MiB; "
                  f"gradients {step['grad_bytes'] / MB:.1f} MiB.",
                  f"Model load: RSS {r['model_load']['rss_before'] / MB:.0f} → "
                  f"{r['model_load']['rss_after'] / MB:.0f} MiB; "
                  f"RSS after each run: {', '.join(f'{x / MB:.0f}' for x in r['rss_after_runs'])} MiB"
                  + (", after handing free heap pages back: "
                     + ", ".join(f"{x / MB:.0f}" for x in r["rss_after_runs_trimmed"]) + " MiB"
                     if "rss_after_runs_trimmed" in r else "") + ".",
                  "RSS after each training step (MiB): "
                  + " ".join(f"{x / MB:.0f}" for x in step.get("rss_by_step", [])),
                  "",
                  "Live tensors > 1 MB after the measured step:", "", "| owner | tensors | MiB |", "|---|---:|---:|"]
        for g, v in step["census"]["groups"].items():
            lines.append(f"| {g} | {v['tensors']} | {v['bytes'] / MB:.1f} |")
        c = step["census"]
        lines += ["", f"Run model storages shared with the base: {c['run_model_storages_shared_with_base']} of "
                  f"{c['run_model_storages']} (base: {c['base_storages']}).", "",
                  f"Records: {json.dumps(r['records'])}", ""]
    return "\n".join(lines)


def machine() -> str:
    name = "unknown CPU"
    flags: set[str] = set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{os.cpu_count()} cores {name}" + (f" ({', '.join(native)})" if native else "")


def build_parser() -> argparse.ArgumentParser:
    """The script's flags, in the ``asymlora`` command line's vocabulary (docs/cli.md)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=("compare", "sft"), help=argparse.SUPPRESS)
    p.add_argument("--workers", default="compare,sft", help="which workers to measure (commas)")
    p.add_argument("--label", default="current", help="name of the result files")
    p.add_argument("--max-steps", type=int, default=30, help="step cap of each run (0: the command's default)")
    p.add_argument("--measure-step", type=int, default=3, help="the step whose memory is split (1-based)")
    p.add_argument("--runs", type=int, default=1, help="jobs run one after the other in the worker")
    p.add_argument("--max-test", type=int, default=500, help="compare: test examples (default run: 2000)")
    p.add_argument("--output-dir", "-o", default=OUT_DIR, metavar="DIR",
                   help="output folder for LABEL.json and LABEL.md (default: docs/results/worker-memory)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    workers = []
    for kind in args.workers.split(","):
        cmd = [sys.executable, __file__, "--child", kind, "--max-steps", str(args.max_steps), "--runs", str(args.runs),
               "--measure-step", str(args.measure_step), "--max-test", str(args.max_test)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            return done.returncode
        r = json.loads(done.stdout.strip().splitlines()[-1])
        r["runs"] = args.runs
        print(f"{kind}: peak RSS {r['peak_rss'] / MB:.0f} MiB", flush=True)
        workers.append(r)
    results = {"label": args.label, "machine": machine(), "workers": workers,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"{args.label}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(args.output_dir, f"{args.label}.md"), "w") as fh:
        fh.write(to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
