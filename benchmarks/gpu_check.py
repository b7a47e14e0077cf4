"""The CUDA paths in one go (about 8 minutes on one GPU): the tests that only a GPU runs, the
training-step benchmark on LLaMA-2-7B layer shapes (asymlora b-only vs PEFT LoRA: step time and
``torch.cuda.max_memory_allocated``), and ``asymlora compare --quick`` on the GPU. Writes one
results folder (``results.json``, ``summary.txt``, each step's log) and prints the summary.

    python -m benchmarks.gpu_check [--output-dir DIR] [--dry-run]
    bash benchmarks/gpu_check.sh   (the same)

Without a CUDA GPU it says so in one line and exits 2; ``--dry-run`` lists the steps and exits.
Exit status 0 when every step passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the tests whose CUDA path only a GPU exercises (skipped, or on their CPU path, elsewhere)
CUDA_TESTS = [
    "tests/test_train_resume.py::test_fp16_on_cuda_resume_matches_uninterrupted",
    "tests/test_cuda.py::test_fit_runs_on_the_gpu_and_its_peak_counts_a_known_tensor_exactly",
    "tests/test_cuda.py::test_bf16_on_cuda_tracks_float32",
    "tests/test_train.py::test_bf16_tracks_float32_and_leaves_a_float32_model",
    "tests/test_train.py::test_peak_memory_and_wall_time_against_known_sizes",
]

#: LLaMA-2-7B's decoder layer (hidden 4096, MLP 11008, 32 heads); 2 layers, batch 4 x 512 tokens
LLAMA2_7B_LAYER = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "num_hidden_layers": 2}
BENCH = {"batch": 4, "seq": 512, "r": 16, "targets": ["q_proj", "v_proj"], "steps": 10, "warmup": 3}


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    timeout_s: int


def steps(out: Path) -> list[Step]:
    py = sys.executable
    return [
        Step("cuda-tests", f"pytest on the {len(CUDA_TESTS)} CUDA-path tests (none may skip)",
             [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS], 150),
        Step("train-benchmark", "one training step on 2 LLaMA-2-7B layers (bf16 base, batch 4 x 512, r=16, "
             "q/v): asymlora b-only vs PEFT LoRA, median step time and torch.cuda.max_memory_allocated",
             [py, "-m", "benchmarks.gpu_check", "--bench-only", "--output-dir", str(out)], 150),
        Step("compare-quick", "asymlora compare --quick on the GPU",
             [py, "-m", "asymlora.cli", "compare", "--quick", "--no-progress", "-o", str(out / "compare")], 180),
    ]


# ----------------------------------------------------------------------------- the benchmark
def _bench_variant(kind: str) -> dict:
    import torch

    row = _measure_variant(kind)  # its model, optimizer and inputs are freed when it returns
    torch.cuda.empty_cache()
    return row


def _measure_variant(kind: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, max_position_embeddings=BENCH["seq"], **LLAMA2_7B_LAYER)
    base = LlamaModel(cfg).to(device="cuda", dtype=torch.bfloat16)
    for p in base.parameters():
        p.requires_grad_(False)
    if kind == "asym-b-only":
        from asymlora.core.config import AsymLoraConfig
        from asymlora.core.inject import wrap

        model = wrap(base, AsymLoraConfig.preset("b-only", r=BENCH["r"], target_modules=BENCH["targets"]))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=BENCH["r"], lora_alpha=2 * BENCH["r"],
                                                target_modules=BENCH["targets"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(BENCH["batch"], BENCH["seq"], cfg.hidden_size, device="cuda", dtype=torch.bfloat16)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(inputs_embeds=x).last_hidden_state.float().pow(2).mean()
        loss.backward()
        opt.step()

    for _ in range(BENCH["warmup"]):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    times = []
    for _ in range(BENCH["steps"]):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row = {"median_step_s": sorted(times)[len(times) // 2], "step_s": times,
           "max_memory_allocated": torch.cuda.max_memory_allocated(),
           "step_memory_over_resident": torch.cuda.max_memory_allocated() - before,
           "trainable_params": sum(p.numel() for p in params)}
    return row


def bench(out: Path) -> dict:
    import torch

    res = {"device": torch.cuda.get_device_name(0), "shapes": LLAMA2_7B_LAYER, **BENCH, "variants": {}}
    for kind in ("asym-b-only", "peft-lora"):
        res["variants"][kind] = _bench_variant(kind)
    ours, peft = res["variants"]["asym-b-only"], res["variants"]["peft-lora"]
    res["step_time_ratio_vs_peft"] = ours["median_step_s"] / peft["median_step_s"]
    res["peak_memory_ratio_vs_peft"] = ours["max_memory_allocated"] / peft["max_memory_allocated"]
    res["pass"] = ours["max_memory_allocated"] < peft["max_memory_allocated"]  # b-only keeps no A gradients / inputs
    (out / "train_benchmark.json").write_text(json.dumps(res, indent=1))
    print(f"b-only / PEFT LoRA: step time {res['step_time_ratio_vs_peft']:.3f}x, "
          f"peak memory {res['peak_memory_ratio_vs_peft']:.3f}x "
          f"({ours['max_memory_allocated'] / 2**20:.0f} vs {peft['max_memory_allocated'] / 2**20:.0f} MiB)")
    return res


# ----------------------------------------------------------------------------- the driver
def _run_step(step: Step, out: Path) -> dict:
    t0 = time.perf_counter()
    log = out / f"{step.name}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout_s)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {step.timeout_s} s"
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    ok = rc == 0
    if step.name == "cuda-tests" and " skipped" in text:
        ok = False  # on a GPU none of them may skip
    if step.name == "train-benchmark" and ok:
        ok = json.loads((out / "train_benchmark.json").read_text())["pass"]
    tail = [line for line in str(text).strip().splitlines() if line.strip()][-1:] or [""]
    return {"step": step.name, "what": step.what, "ok": ok, "returncode": rc,
            "seconds": round(time.perf_counter() - t0, 1), "last_line": tail[0][:300], "log": str(log)}


def build_parser() -> argparse.ArgumentParser:
    """The check's flags, in the ``asymlora`` command line's vocabulary (docs/cli.md)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", "-o", default=None, metavar="DIR",
                   help="results folder (default: benchmarks/gpu-check-<UTC time>)")
    p.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    p.add_argument("--bench-only", action="store_true", help=argparse.SUPPRESS)  # the benchmark step itself
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir or ROOT / "benchmarks" / time.strftime("gpu-check-%Y%m%d-%H%M%S", time.gmtime()))
    plan = steps(out)
    if args.dry_run:
        print(f"would write {out}/ (results.json, summary.txt, one log per step); steps, "
              f"{sum(s.timeout_s for s in plan)} s at most:")
        for i, s in enumerate(plan, 1):
            print(f"{i}. {s.name} ({s.timeout_s} s at most): {s.what}")
            print(f"   {' '.join(s.argv)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False here); "
              "`python -m benchmarks.gpu_check --dry-run` lists what it would run", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.bench_only:
        return 0 if bench(out)["pass"] else 1
    rows = [_run_step(s, out) for s in plan]
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": rows}
    bench_file = out / "train_benchmark.json"
    if bench_file.is_file():
        results["train_benchmark"] = json.loads(bench_file.read_text())
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"gpu check on {results['device']} (torch {torch.__version__}): {out}"]
    lines += [f"{'PASS' if r['ok'] else 'FAIL'} {r['step']} ({r['seconds']} s): {r['last_line']}" for r in rows]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
