"""One process of a sharded run whose checkpoint files get pickle traps, for
tests/test_resume_safety.py (run under torchrun). Not a test module.

    python trap_worker.py OUT SHARDING

trains the tiny Llama of ``sharded_worker`` under SHARDING (checkpoints at steps 2 and 4), then,
for each state file a resume reads (``FILES``), rank 0 replaces that file of the checkpoint with
a pickle whose loading would create OUT/fired-<file>, and every rank tries to resume. Each rank
writes OUT/traps_<rank>.json: per file, the refusal message (or None) and whether the model was
left as it was; then, with the original files back, the step a clean resume starts from.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sharded_worker as sw  # noqa: E402
from asymlora.errors import UserError  # noqa: E402
from asymlora.training.loop import fit  # noqa: E402

# every state file a resume reads with torch.load (scaler.pt: read whenever present, also by a
# run without loss scaling, which refuses it)
FILES = ["optimizer.pt", "scheduler.pt", "rng_state_0.pt", "rng_state_1.pt", "scaler.pt"]


class Trap:
    """Unpickling this calls open(marker, "w"): the marker file is the evidence it fired."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    out, sharding = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    run = os.path.join(out, "run")
    fit(sw.model(), sw.data(), sw.collate, sw.args(run, sharding, 2))
    rank = dist.get_rank()
    ckpt = os.path.join(run, "checkpoint")
    results: dict[str, object] = {}
    for name in FILES:
        path = os.path.join(ckpt, name)
        original = open(path, "rb").read() if os.path.exists(path) else None
        if rank == 0:
            torch.save({"state": Trap(os.path.join(out, f"fired-{name}"))}, path)
        dist.barrier()
        model = sw.model()
        before = state(model)
        try:
            fit(model, sw.data(), sw.collate, sw.args(run, sharding, 2, resume=True))
            refused = None
        except UserError as err:
            refused = str(err)
        after = state(model)
        results[name] = {"refused": refused, "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
        dist.barrier()
        if rank == 0:
            if original is None:
                os.remove(path)
            else:
                with open(path, "wb") as fh:
                    fh.write(original)
        dist.barrier()
    res = fit(sw.model(), sw.data(), sw.collate, sw.args(run, sharding, 2, resume=True))
    results["clean_resume_from"] = res.resumed_from_step
    with open(os.path.join(out, f"traps_{rank}.json"), "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
    dist.barrier()
    dist.destroy_process_group()
