"""A command's first line of output is its own: nothing that torchao, bitsandbytes or DeepSpeed
print merely for being installed comes before it (asymlora.startup)."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading

import pytest

import asymlora

SRC = os.path.dirname(os.path.dirname(os.path.abspath(asymlora.__file__)))
# compare's own first line: "asymlora compare: all-MiniLM-L6-v2 (22.7M params) on fortunes (5 classes); ..."
COMPARE_FIRST_LINE = re.compile(r"^asymlora compare: \S+ \([\d.]+M params\) on fortunes \(5 classes\); train \d+ ")


@pytest.mark.needs_assets("minilm", "fortunes")
def test_compare_prints_its_own_line_first(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    env.pop("HF_HUB_OFFLINE", None)  # the command goes offline by itself
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from asymlora.cli.main import main; sys.exit(main())",
         "compare", "--quick", "--output-dir", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and any worker it started: this test's group only
        proc.wait()
        proc.stdout.close()
    assert COMPARE_FIRST_LINE.match(first), f"first line of output: {first!r}"
