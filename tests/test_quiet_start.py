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


def _progress_bar_enabled(start_command: bool) -> str:
    """transformers' own verdict on its progress bars (the "Loading weights" bar is one) in a
    fresh interpreter, with or without the command's start-up."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env["PYTHONPATH"] = SRC + os.pathsep + os.environ.get("PYTHONPATH", "")
    code = ("from asymlora.startup import start_command_process; start_command_process()\n" if start_command
            else "import asymlora, asymlora.startup\n")
    code += "from transformers.utils import logging; print(logging.is_progress_bar_enabled())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True, timeout=300).stdout.strip()


def test_command_processes_show_no_weight_loading_bar_and_the_library_leaves_it_alone():
    assert _progress_bar_enabled(start_command=True) == "False"
    assert _progress_bar_enabled(start_command=False) == "True"  # importing asymlora changes nothing
