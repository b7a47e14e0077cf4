"""A killed worker is survivable: SIGKILL (what the out-of-memory killer sends) to one busy worker
process of ``asymlora compare --workers 2`` ends the command with one line naming the lost run and
that --resume goes on, no traceback; --resume then ends with the records of an uninterrupted sweep
(slow: the real bundled model, three sweeps)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from test_sweep import FINISHED_RUN, Sweep, assert_same_records, descendants

needs_real = pytest.mark.needs_assets("minilm", "fortunes")

# short enough for three sweeps in one test; pilots of two rates per adapter strategy, two seeds
FLAGS = ("--strategies", "lora,b-only", "--max-steps", "40", "--max-train", "240", "--workers", "2")


def pool_workers(pid: int) -> list[int]:
    """The worker processes of the sweep ``pid`` (spawned pool children; not the resource tracker)."""
    out = []
    for child in descendants(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            out.append(child)
    return out


@pytest.mark.slow
@needs_real
def test_a_worker_killed_from_outside_ends_in_one_line_and_resume_completes(tmp_path):
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    sweep = Sweep(cut, *FLAGS)
    try:
        sweep.wait_for(FINISHED_RUN, timeout=900)  # a worker has finished a job: the others are busy
        workers = pool_workers(sweep.proc.pid)
        assert len(workers) == 2, workers
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        rc = sweep.proc.wait(timeout=300)
    finally:
        sweep.kill()
    time.sleep(0.5)
    stderr = "".join(sweep.stderr)
    assert rc == 1, stderr
    assert "Traceback" not in stderr and "BrokenProcessPool" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("asymlora compare: a worker process died (killed from outside: SIGKILL, out of "
                               "memory?); the runs not finished then (running or queued) are lost: [")
    assert lines[0].endswith(f"; the finished runs are kept in {cut}/results.json: add --resume to go on")
    kept = json.loads((cut / "results.json").read_text())
    assert kept["complete"] is False and kept["journal"]

    resumed = Sweep(cut, *FLAGS, "--resume")
    assert resumed.proc.wait(timeout=1800) == 0, "".join(resumed.stdout + resumed.stderr)
    reference = Sweep(whole, *FLAGS)
    assert reference.proc.wait(timeout=1800) == 0, "".join(reference.stdout + reference.stderr)
    a, b = json.loads((cut / "results.json").read_text()), json.loads((whole / "results.json").read_text())
    assert a["complete"] is True and len(a["runs"]) == 4
    assert_same_records(a, b)
