"""One process of a sharded training run, for tests/test_sharding.py (run under torchrun, or
alone as the one-process reference). Not a test module.

    python sharded_worker.py OUT SHARDING BATCH_SIZE

trains a b-only adapter on a tiny Llama for ``STEPS`` steps (two micro-batches per step) and
writes, from rank 0, OUT/result.pt (losses, grad norms, world size, sharding). Under a
sharding it also: checks the guard (an Accelerate FSDP launch config without a GPU must be
refused), saves the trained adapter gathered (OUT/adapter), and interrupts and resumes a second
run from its step-2 checkpoint (OUT/resumed.pt, OUT/resumed_adapter).
"""
from __future__ import annotations

import os
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402  (after T0: the start-up time counts the imports)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asymlora  # noqa: E402
from asymlora.errors import UserError  # noqa: E402
from asymlora.training.loop import TrainArgs, fit  # noqa: E402
from asymlora.training.sharding import save_adapter_gathered  # noqa: E402
from conftest import tiny_llama  # noqa: E402

STEPS = 4


def model():
    return asymlora.wrap(tiny_llama(), asymlora.AsymLoraConfig.preset("b-only", r=4, seed=0))


def data(n: int = 16, length: int = 8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, length), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def args(out: str, sharding: str | None, batch: int, **kw) -> TrainArgs:
    return TrainArgs(lr=1e-2, max_steps=STEPS, batch_size=batch, grad_accum=2, warmup_steps=1, progress=False,
                     output_dir=out, checkpoint_every=2, sharding=sharding, **kw)


def record(res, path: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"losses": [h["loss"] for h in res.history], "grad_norms": [h["grad_norm"] for h in res.history],
                    "eval": [h.get("eval_loss") for h in res.history], "world": res.world_size,
                    "sharding": res.sharding, "global_batch": res.global_batch_size,
                    "resumed_from": res.resumed_from_step}, path)


def guard_refuses_accelerate_fallback(out: str, batch: int) -> str:
    """An Accelerate FSDP2 launch config on CPU: Accelerate runs plain data parallel; fit must stop."""
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    try:
        fit(model(), data(), collate, args(os.path.join(out, "refused"), None, batch))
    except UserError as err:
        return str(err)
    finally:
        del os.environ["ACCELERATE_USE_FSDP"], os.environ["FSDP_VERSION"]
    raise AssertionError("fit trained under Accelerate's FSDP fallback instead of refusing")


def interrupted_then_resumed(out: str, sharding: str, batch: int) -> None:
    calls = {"n": 0}

    def crash_in_step_3(m, b):
        calls["n"] += 1
        if calls["n"] == 5:  # micro-batch 1 of step 3 (two per step)
            raise KeyboardInterrupt("simulated kill")
        return m(**b).loss

    run = os.path.join(out, "resumed_run")
    try:
        fit(model(), data(), collate, args(run, sharding, batch), loss_fn=crash_in_step_3)
    except KeyboardInterrupt:
        pass
    m = model()
    res = fit(m, data(), collate, args(run, sharding, batch, resume=True))
    record(res, os.path.join(out, "resumed.pt"))
    save_adapter_gathered(m, os.path.join(out, "resumed_adapter"))


def stamp(what: str) -> None:
    # on stderr, which the test shows when a run fails: it says how far each rank got
    print(f"[{time.perf_counter() - T0:.1f} s] rank {os.environ.get('RANK', '0')}: {what}", file=sys.stderr, flush=True)


def done_marker(out: str, rank: int) -> str:
    """Written by each rank once all its work and output files are done, before the shutdown."""
    return os.path.join(out, f"done.rank{rank}")


def main() -> None:
    out, sharding, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sharding = None if sharding == "none" else sharding
    torch.set_num_threads(1)
    if sharding is not None:
        message = guard_refuses_accelerate_fallback(out, batch)
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(out, "guard.txt"), "w") as fh:
                fh.write(message)
        stamp("guard checked")
    eval_batch = collate(data()[:4])

    def eval_fn(m):
        return {"eval_loss": float(m(**eval_batch).loss)}

    m = model()
    res = fit(m, data(), collate, args(os.path.join(out, "run"), sharding, batch, eval_every=2), eval_fn=eval_fn)
    record(res, os.path.join(out, "result.pt"))
    save_adapter_gathered(m, os.path.join(out, "adapter"))
    stamp("trained and saved")
    if sharding is not None:
        interrupted_then_resumed(out, sharding, batch)
        stamp("interrupted and resumed")


if __name__ == "__main__":
    main()
    with open(done_marker(sys.argv[1], int(os.environ.get("RANK", "0"))), "w") as fh:
        fh.write("done\n")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # An orderly shutdown, then no interpreter finalisation: with gloo (and DeepSpeed's
        # shared-memory op) native threads still alive at exit, a rank can die in std::terminate
        # ("terminate called without an active exception"; seen in two full-suite runs, never alone).
        dist.barrier()
        dist.destroy_process_group()
        stamp("shut down")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
