"""Three task adapters merged into one: exact for b-only adapters, approximate for LoRA.

The three tasks of ``examples/multi_adapter.py`` (fortune topics, tweet sentiment, tweet-vs-
fortune origin) on the bundled all-MiniLM-L6-v2, each with its own linear head kept outside the
model. Trained twice: as b-only adapters (A frozen from seed 0: one A shared by all three) and
as LoRA adapters (A and B trained). Then merged into one adapter with equal weights:

  b-only  asymlora.adapters.add_weighted_adapter(..., method="exact"): Σ wᵢ·Bᵢ on the shared A
  LoRA    PEFT's add_weighted_adapter with combination_type linear, cat and svd
          (and the same PEFT calls on the b-only adapters, exported to PEFT)

and each task's test accuracy (its own head on the merged adapter) is printed beside its own
adapter's and the base encoder's (the same head, adapters off), with the relative ΔW error of
every merge, ‖Σ wᵢΔWᵢ − ΔW_merged‖ / ‖Σ wᵢΔWᵢ‖ over all adapted layers (float64).

    python examples/merge_adapters.py [--max-steps 60] [--threads 1] [-o docs/results/merging]

bf16 base (factors and heads float32), 32 tokens per text, test sets subsampled to
--max-test rows (default 200: topics and sentiment are sampled, origin's 200 are whole) — kept cheap on a shared CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

import asymlora
from asymlora.bundled import default_model_path
from asymlora.core.adapters import add_adapter, set_adapter
from asymlora.core.inject import disable_adapters
from asymlora.errors import UserError
from asymlora.fileio import atomic_write_text
from asymlora.formats.peft import export_peft_adapters
from asymlora.merging import add_weighted_adapter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multi_adapter import pooled, tasks  # noqa: E402  (the example's data and pooling)

TASKS = ("topics", "sentiment", "origin")


def cpu_info() -> dict:
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    have = set(flags.split())
    return {"model_name": model or platform.processor(), "avx512_bf16": "avx512_bf16" in have,
            "amx_bf16": "amx_bf16" in have, "cores_visible": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def build_parser() -> argparse.ArgumentParser:
    """The example's flags, in the ``asymlora`` command line's vocabulary (docs/cli.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=60, help="training steps per adapter (default 60)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", "-r", type=int, default=8, help="adapter rank r (default 8)")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--max-test", type=int, default=200, help="at most this many test rows per task (default 200)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output-dir", "-o", default=None, metavar="DIR",
                        help="output folder for results.json and results.md (default: print only)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    data = tasks()
    tests = {}
    for name in TASKS:
        texts, labels = data[name][3], data[name][4]
        rows = list(range(len(texts)))
        if len(rows) > args.max_test:
            rows = sorted(random.Random(0).sample(rows, args.max_test))
        tests[name] = ([texts[i] for i in rows], [labels[i] for i in rows])

    def encode(texts):
        return tok(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")

    def base_model():
        return AutoModel.from_pretrained(path, dtype=torch.bfloat16)

    def train(preset: str) -> tuple[nn.Module, dict[str, nn.Linear]]:
        model = base_model()
        cfg = asymlora.AsymLoraConfig.preset(preset, r=args.rank)   # query/value; seed 0 for all three
        heads = {}
        for i, name in enumerate(TASKS):
            texts, labels, label_names = data[name][0], data[name][1], data[name][2]
            if i == 0:
                asymlora.wrap(model, cfg, adapter_name=name)
            else:
                add_adapter(model, name, cfg)
            set_adapter(model, name)
            torch.manual_seed(i)
            heads[name] = nn.Linear(model.config.hidden_size, len(label_names))
            params = [p for p in model.parameters() if p.requires_grad] + list(heads[name].parameters())
            opt = torch.optim.AdamW(params, lr=args.lr)
            model.train()
            g = random.Random(i)
            for step in range(args.max_steps):
                idx = g.sample(range(len(texts)), args.batch_size)
                logits = heads[name](pooled(model, encode([texts[j] for j in idx])).float())
                loss = nn.functional.cross_entropy(logits, torch.tensor([labels[j] for j in idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if (step + 1) % 25 == 0 and step + 1 < args.max_steps:
                    print(f"    step {step + 1}: loss {loss.item():.3f}", flush=True)
            print(f"  {preset} {name}: {args.max_steps} steps, last loss {loss.item():.3f}", flush=True)
        model.eval()
        return model, heads

    @torch.no_grad()
    def accuracy(model, head, name, **kw) -> float:
        texts, labels = tests[name]
        right = 0
        for s in range(0, len(texts), 128):
            enc = encode(texts[s:s + 128])
            pred = head(pooled(model, {**enc, **kw}).float()).argmax(-1)
            right += int((pred == torch.tensor(labels[s:s + 128])).sum())
        return right / len(texts)

    def all_tasks(model, heads) -> dict[str, float]:
        return {n: accuracy(model, heads[n], n) for n in TASKS}

    results: dict = {"setup": {**vars(args), "tasks": {n: {"train": len(data[n][0]), "test": len(tests[n][0]),
                                                           "labels": data[n][2]} for n in TASKS},
                               "weights": "equal: 1/3 each (mean) and 1 each (sum)", "base": "all-MiniLM-L6-v2, bf16",
                               "cpu": cpu_info(), "torch": torch.__version__}, "rows": []}
    try:
        import peft
        results["setup"]["peft"] = peft.__version__
    except ImportError as err:  # pragma: no cover
        raise SystemExit(f"this example compares with PEFT: pip install peft ({err})") from err
    timings = {}

    def row(family, method, weights, acc, error, note=""):
        r = {"adapters": family, "merge": method, "weights": weights, "accuracy": acc, "relative_dW_error": error,
             "note": note}
        results["rows"].append(r)
        accs = "  ".join(f"{n} {acc[n]:.3f}" for n in TASKS)
        err = "" if error is None else f"  dW error {error:.3g}"
        print(f"{family:7s} {method:28s} {weights:5s} {accs}{err}", flush=True)

    for preset, family in (("b-only", "b-only"), ("lora", "LoRA")):
        t0 = time.perf_counter()
        print(f"training the three {family} adapters", flush=True)
        model, heads = train(preset)
        timings[f"train {family}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        own = {}
        for n in TASKS:
            set_adapter(model, n)
            own[n] = accuracy(model, heads[n], n)
        row(family, "own adapter (no merge)", "-", own, None)
        with disable_adapters(model):
            row(family, "base encoder (adapters off)", "-", all_tasks(model, heads), None)
        for label, w in (("mean", [1 / 3] * 3), ("sum", [1.0] * 3)):
            try:
                rep = add_weighted_adapter(model, list(TASKS), w, f"merged_{label}")
            except UserError as err:
                results.setdefault("refused", {})[family] = str(err)
                print(f"{family:7s} asymlora exact               {label:5s} refused: {str(err)[:150]}...", flush=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # the error is in the table
                    rep = add_weighted_adapter(model, list(TASKS), w, f"linear_{label}", method="linear")
                set_adapter(model, f"linear_{label}")
                row(family, "asymlora linear (naive FedAvg)", label, all_tasks(model, heads), rep.error,
                    "A averaged, B summed with the weights")
                continue
            set_adapter(model, f"merged_{label}")
            row(family, "asymlora exact", label, all_tasks(model, heads), rep.error)
        timings[f"evaluate {family} (own, base, asymlora)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            folders = export_peft_adapters(model, tmp, adapter_names=list(TASKS))
            pm = peft.PeftModel.from_pretrained(base_model(), folders[TASKS[0]], adapter_name=TASKS[0])
            for n in TASKS[1:]:
                pm.load_adapter(folders[n], adapter_name=n)
        pm.eval()
        for combo in ("linear", "cat", "svd"):
            for label, w in (("mean", [1 / 3] * 3), ("sum", [1.0] * 3)):
                new = f"{combo}_{label}"
                pm.add_weighted_adapter(list(TASKS), w, new, combination_type=combo)
                pm.set_adapter(new)
                dtype = str(next(m.lora_A[new].weight.dtype for m in pm.modules() if hasattr(m, "lora_A")
                                 and new in getattr(m, "lora_A", {}))).replace("torch.", "")
                note = f"merged factors stored in {dtype}" + ("; svd_rank 8 (PEFT's default)" if combo == "svd" else "")
                row(family, f"PEFT add_weighted_adapter {combo}", label, all_tasks(pm, heads),
                    peft_error(pm, list(TASKS), w, new), note)
        timings[f"merge + evaluate {family} in PEFT"] = time.perf_counter() - t0
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    print(f"\ntotal {results['total_s']} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        atomic_write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2))
        atomic_write_text(os.path.join(args.output_dir, "results.md"), markdown(results))
        print(f"wrote {args.output_dir}/results.json and results.md")


def peft_error(pm, adapters, weights, new) -> float:
    """‖Σ wᵢ·sᵢ·Bᵢ·Aᵢ − s·B·A (merged)‖ / ‖Σ wᵢ·sᵢ·Bᵢ·Aᵢ‖ over all of PEFT's LoRA layers (float64),
    from the factors PEFT holds (not from PEFT's own delta computation)."""
    from peft.tuners.lora import LoraLayer

    def delta(module, name):
        a = module.lora_A[name].weight.detach().double()
        b = module.lora_B[name].weight.detach().double()
        return module.scaling[name] * (b @ a)

    err2 = ref2 = 0.0
    for module in pm.modules():
        if isinstance(module, LoraLayer) and new in module.lora_A:
            want = sum(w * delta(module, n) for n, w in zip(adapters, weights))
            err2 += float((want - delta(module, new)).norm() ** 2)
            ref2 += float(want.norm() ** 2)
    return (err2 / ref2) ** 0.5


def markdown(results: dict) -> str:
    s = results["setup"]
    cpu = s["cpu"]
    lines = [
        "# Three adapters merged into one (bundled MiniLM)",
        "",
        f"Produced by `python examples/merge_adapters.py --max-steps {s['max_steps']} --threads {s['threads']} "
        f"-o docs/results/merging`. "
        f"{s['max_steps']} steps per adapter, batch {s['batch_size']}, lr {s['lr']}, r={s['rank']} on query/value, "
        f"{s['max_length']} tokens, {s['base']}; test rows: "
        + ", ".join(f"{n} {v['test']}" for n, v in s["tasks"].items()) + ".",
        f"CPU: {cpu['model_name']} (avx512_bf16: {cpu['avx512_bf16']}, amx_bf16: {cpu['amx_bf16']}), "
        f"{cpu['torch_threads']} torch threads; torch {s['torch']}, peft {s['peft']}. "
        f"Total {results['total_s']:.0f} s.",
        "",
        "| adapters | merge | weights | topics | sentiment | origin | relative ΔW error | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        err = "" if r["relative_dW_error"] is None else f"{r['relative_dW_error']:.2g}"
        acc = " | ".join(f"{r['accuracy'][n]:.3f}" for n in TASKS)
        lines.append(f"| {r['adapters']} | {r['merge']} | {r['weights']} | {acc} | {err} | {r['note']} |")
    for fam, msg in results.get("refused", {}).items():
        lines += ["", f"asymlora exact on the {fam} adapters was refused: `{msg}`"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
