"""The sweep engine under compare and sft (``asymlora.sweep``): a real ``asymlora compare
--quick`` in a subprocess, stopped by a signal, must take every worker with it and leave a
readable results.json behind (slow: the real bundled model)."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import asymlora
from asymlora.sweep.backends import Job
from asymlora.sweep.resume import Journal, data_fingerprint, model_fingerprint
from conftest import require

needs_real = pytest.mark.needs_assets("minilm", "fortunes")

SRC = os.path.dirname(os.path.dirname(os.path.abspath(asymlora.__file__)))
FINISHED_RUN = re.compile(r"^\[\d+/\d+\] \S")  # a run's report line: "[3/10] lora r=4  seed 0 ..."


class Sweep:
    """``asymlora compare --quick`` (and extra flags) in a subprocess, its output read line by
    line on a thread so the test can wait for a given line."""

    def __init__(self, out, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asymlora.cli", "compare", "--quick", "--no-progress", "--no-plots",
             "-o", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if sink is self.stdout:
                self.lines.put(line)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, f"the sweep ended early:\n{''.join(self.stdout + self.stderr)}"
                continue
            if pattern.search(line):
                return line
        raise AssertionError(f"no line matching {pattern.pattern!r} in {timeout:.0f} s:\n{''.join(self.stdout)}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children of children too)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped computes nothing: not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def uninterrupted_quick(tmp_path_factory):
    """The results of ``compare --quick --workers 2`` run to the end without a stop."""
    out = tmp_path_factory.mktemp("whole") / "out"
    sweep = Sweep(out, "--workers", "2")
    assert sweep.proc.wait(timeout=1800) == 0, "".join(sweep.stdout + sweep.stderr)
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@needs_real
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_worker_and_keeps_the_finished_runs(tmp_path, signum, uninterrupted_quick):
    out = tmp_path / "out"
    sweep = Sweep(out, "--workers", "2")
    try:
        sweep.wait_for(FINISHED_RUN, timeout=900)
        end = time.monotonic() + 300  # the adapter pilots are in the workers by now, or soon
        while (len(descendants(sweep.proc.pid)) < 2 or not (out / "results.json").exists()) and time.monotonic() < end:
            time.sleep(0.5)
        children = descendants(sweep.proc.pid)
        assert len(children) >= 2, "no worker processes to stop"
        t = time.monotonic()
        sweep.proc.send_signal(signum)
        rc = sweep.proc.wait(timeout=30)
        assert time.monotonic() - t < 15, "the parent took too long to stop"
        time.sleep(max(0.0, 10 - (time.monotonic() - t)))
        assert [p for p in children if alive(p)] == [], "worker processes outlived the sweep"
    finally:
        sweep.kill()
    assert rc == 128 + signum
    err = [line for line in "".join(sweep.stderr).splitlines() if line.startswith("asymlora compare:")]
    assert len(err) == 1 and err[0].startswith(f"asymlora compare: stopped by {signal.Signals(signum).name}; "
                                               f"the finished runs are kept in {out}/results.json"), sweep.stderr
    assert "Traceback" not in "".join(sweep.stderr)
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and partial["journal"]
    # what it kept is enough: --resume ends with the records of a sweep that was never stopped
    resumed = Sweep(out, "--workers", "2", "--resume")
    assert resumed.proc.wait(timeout=1800) == 0, "".join(resumed.stdout + resumed.stderr)
    a, b = json.loads((out / "results.json").read_text()), uninterrupted_quick
    assert a["complete"] is True and not (out / "runs").exists()
    assert_same_records(a, b)
    assert a["verdict_lines"] == b["verdict_lines"]


# ----------------------------------------------------------------------------- resume

TIMINGS = ("wall_time_s", "eval_time_s", "peak_memory_bytes", "step_time_s")  # step_time_s: wall time per step


def assert_same_records(a, b):
    """Two sweeps' results hold the same runs and lr choices, timings and memory peaks aside."""
    assert len(a["runs"]) == len(b["runs"]) > 0
    for ra, rb in zip(a["runs"], b["runs"]):
        assert without_timings(ra) == without_timings(rb), (ra["strategy"], ra["seed"])
    assert without_timings(a["lr_selection"]) == without_timings(b["lr_selection"])


def without_timings(obj):
    """A record (or list of them) with its timings and memory peaks left out."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [without_timings(x) for x in obj]
    return obj


@pytest.mark.slow
@needs_real
def test_a_killed_compare_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, uninterrupted_quick):
    cut = tmp_path / "cut"
    sweep = Sweep(cut, "--workers", "2")
    try:  # SIGKILL: no handler runs, the workers die with their parent (PR_SET_PDEATHSIG)
        sweep.wait_for(FINISHED_RUN, timeout=900)
        end = time.monotonic() + 1200
        while time.monotonic() < end:  # until a worker has finished a job (an adapter pilot's first segment)
            saved = json.loads((cut / "results.json").read_text()) if (cut / "results.json").exists() else {}
            if any(e["job"][0] != "head-only" for e in saved.get("journal", [])):
                break
            time.sleep(0.5)
        children = descendants(sweep.proc.pid)
        sweep.proc.kill()
        sweep.proc.wait()
        time.sleep(10)
        assert [p for p in children if alive(p)] == [], "workers outlived a killed parent"
    finally:
        sweep.kill()
    kept = json.loads((cut / "results.json").read_text())
    assert kept["complete"] is False and kept["journal"]
    # a different protocol is refused in one line before any work
    refused = Sweep(cut, "--resume", "--max-steps", "60")
    assert refused.proc.wait(timeout=600) == 2
    time.sleep(0.5)
    assert [line for line in "".join(refused.stderr).splitlines() if line.startswith("asymlora compare:")] == [
        f"asymlora compare: error: --resume: the protocol's settings differ from those of the sweep saved in {cut}; "
        "resume with the same flags, data and model, or start over without --resume"]
    resumed = Sweep(cut, "--workers", "2", "--resume")
    assert resumed.proc.wait(timeout=1800) == 0, "".join(resumed.stdout + resumed.stderr)
    time.sleep(0.5)
    log = "".join(resumed.stdout)
    (tmp_path / "resumed.log").write_text(log)  # kept with pytest's tmp folders, to read what a resume prints
    assert f"resuming the sweep in {cut}: {len(kept['journal'])} finished job" in log
    a, b = json.loads((cut / "results.json").read_text()), uninterrupted_quick
    assert a["complete"] is True and not (cut / "runs").exists()
    assert_same_records(a, b)
    assert a["verdict_lines"] == b["verdict_lines"]


def test_fingerprints_change_with_the_data_and_the_model_files(tmp_path):
    split = [{"input_ids": [1, 2, 3], "labels": 0}, {"input_ids": [4, 5], "labels": 1}]
    batches = [{"input_ids": torch.tensor([[1, 2], [3, 4]])}]
    fp = data_fingerprint(split, batches)
    assert fp == data_fingerprint([dict(x) for x in split], [{"input_ids": torch.tensor([[1, 2], [3, 4]])}])
    assert fp != data_fingerprint(split[:1], batches)
    assert fp != data_fingerprint([split[0], {"input_ids": [4, 5], "labels": 2}], batches)
    assert fp != data_fingerprint(split, [{"input_ids": torch.tensor([[1, 2], [3, 5]])}])
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "README.md").write_text("not part of the model")
    fp = model_fingerprint(str(tmp_path))
    (tmp_path / "README.md").write_text("edited")
    assert model_fingerprint(str(tmp_path)) == fp
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 63 + b"\1")
    assert model_fingerprint(str(tmp_path)) != fp


def test_a_journal_hands_each_saved_outcome_back_once():
    class Spec:
        label, is_adapter = "b-only r=4", True

    pilot, seed_run = Job(Spec(), 0, 0.01, True, until=40), Job(Spec(), 1, 0.01, False)
    done = Journal()
    done.add(pilot, ({"val_accuracy": 0.5, "paused": True}, 1.5))
    saved = Journal(json.loads(json.dumps(done.to_json())))  # through results.json
    assert saved.take(seed_run) is None
    assert saved.take(Job(Spec(), 0, 0.01, True, until=40, resume=True)) is None  # another segment
    assert saved.take(pilot) == ({"val_accuracy": 0.5, "paused": True}, 1.5)
    assert saved.take(pilot) is None and saved.replayed == 1


def test_run_jobs_books_a_saved_outcome_without_running_or_journaling_it_again():
    from asymlora.sweep.backends import InProcess
    from asymlora.sweep.engine import run_jobs

    class Spec:
        label, is_adapter = "b-only r=4", True

    saved_job, new_job = Job(Spec(), 0, 0.01, False), Job(Spec(), 1, 0.01, False)
    done = Journal()
    done.add(saved_job, ({"val_accuracy": 0.5}, 1.5))
    journal = Journal(json.loads(json.dumps(done.to_json())))  # through results.json
    executed: list[int] = []
    booked: dict[int, tuple] = {}

    def execute(_state, _cfg, job, _tag):
        executed.append(job.seed)
        return ({"val_accuracy": 0.7}, 2.0)

    def record(job, outcome, _tag):
        booked[job.seed] = tuple(outcome)
        return []

    backend = InProcess(None, None, execute)
    run_jobs([saved_job, new_job], lambda job: backend, record, lambda job: f"[seed {job.seed}]", lambda: None,
             [backend], journal=journal)
    assert executed == [1]
    assert booked == {0: ({"val_accuracy": 0.5}, 1.5), 1: ({"val_accuracy": 0.7}, 2.0)}
    assert [entry["job"][1] for entry in journal.to_json()] == [0, 1]  # the saved outcome once, then the new one


# ----------------------------------------------------------------------------- layout


def private_cross_imports(root: str) -> list[str]:
    """``from asymlora.X... import _name`` in a module of ``asymlora`` outside package X."""
    import ast

    out = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            here = rel.split("/")[0].removesuffix(".py")
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("asymlora."):
                    there = node.module.split(".")[1]
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                    if there != here and private:
                        out.append(f"{rel}:{node.lineno}: from {node.module} import {', '.join(private)}")
    return out


def test_no_package_imports_another_ones_private_names(tmp_path):
    root = os.path.dirname(asymlora.__file__)
    assert private_cross_imports(root) == []
    # the check itself finds one
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "run.py").write_text("from asymlora.compare.run import _Timed, execute_run\n")
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "ok.py").write_text("from asymlora.compare.run import _Timed\n")
    assert private_cross_imports(str(tmp_path)) == ["sft/run.py:1: from asymlora.compare.run import _Timed"]


# ----------------------------------------------------------------------------- backends


@pytest.mark.slow
@needs_real
def test_the_ray_backend_gives_the_records_of_the_local_one(tmp_path, uninterrupted_quick):
    with warnings.catch_warnings():  # importing ray adds a blanket ignore of urllib3's DependencyWarning
        require("ray")
    on_ray = Sweep(tmp_path / "ray", "--backend", "ray", "--cpus-per-run", "1")  # a local Ray cluster on CPU
    assert on_ray.proc.wait(timeout=1800) == 0, "".join(on_ray.stdout + on_ray.stderr)
    time.sleep(0.5)
    assert "Ray tasks on a local cluster, 1 CPU each" in "".join(on_ray.stdout)
    a = json.loads((tmp_path / "ray" / "results.json").read_text())
    b = uninterrupted_quick  # the local backend's records
    assert_same_records(a, b)


def test_jobs_run_in_this_process_take_the_thread_count_they_are_given():
    """compare's head-only jobs run in the parent beside worker processes at one thread, as a
    worker does, whatever this process's own count (a load-dependent probe picks it: with 2
    threads the head's small GEMMs round differently, and a resumed sweep's head-only records
    differed from an uninterrupted one's in the last bits). The caller's count is put back."""
    from asymlora.sweep.backends import InProcess

    def threads_seen(state, cfg, job, tag):
        return torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert InProcess(None, None, threads_seen, threads=1).submit("job", "tag").result() == 1
        assert torch.get_num_threads() == 2
        assert InProcess(None, None, threads_seen).submit("job", "tag").result() == 2
    finally:
        torch.set_num_threads(before)
