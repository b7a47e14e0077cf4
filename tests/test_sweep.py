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

import pytest

import asymlora

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


@pytest.mark.slow
@needs_real
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_worker_and_keeps_the_finished_runs(tmp_path, signum):
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
    assert partial["complete"] is False
