"""Output that cannot be written is one line, never an OSError traceback: an --output-dir under a
regular file or on a read-only file system is refused before any work (exit 2, naming the path and
the OS error), for every command with -o; a disk that fills up during the work is one line naming
the file and the error (exit 1), and the complete file written there before survives. The file
systems are real (small tmpfs mounts) where the machine allows mounting, else the tests skip; the
full disk is also simulated at the write, which runs everywhere."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import subprocess
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from asymlora.cli.main import build_parser, main

# every command with -o, with the other arguments it needs to parse (the -o check comes first)
COMMANDS = {
    "compare": ["--quick"], "sft": ["--quick"], "train": ["--quick"], "run": ["glue"], "results": ["{dir}"],
    "theory simulate": [], "theory bound": [], "similarity": ["--demo"], "export": ["{dir}"],
    "merge": ["{dir}", "{dir}"], "bench": ["--quick"], "probe": [], "eval": [],
}


def commands_with_output_dir() -> set[str]:
    out: set[str] = set()

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for sub, p in subs[0].choices.items():
                walk(f"{name} {sub}".strip(), p)
        elif any(a.dest == "output_dir" for a in parser._actions):
            out.add(name)

    walk("", build_parser())
    return out


def test_the_table_covers_every_command_with_an_output_dir():
    assert set(COMMANDS) == commands_with_output_dir()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_output_dir_under_a_regular_file_is_refused_before_any_work(tmp_path, capsys, command):
    blocker = tmp_path / "FILE"
    blocker.write_text("the user's file")
    out = blocker / "out"
    argv = [*command.split(), *(a.replace("{dir}", str(tmp_path)) for a in COMMANDS[command]), "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"asymlora {command}: error: cannot write to --output-dir {out}: Not a directory "
                   f"({blocker} is a file)"]
    assert blocker.read_text() == "the user's file"


@contextlib.contextmanager
def tmpfs(folder, *options: str):
    """A small real tmpfs mounted at ``folder`` (skips where this machine does not allow it)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=64k", *options]), "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_file_system_is_refused_before_any_work(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "ro") as ro:
        assert main(["theory", "bound", "-o", str(ro / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"asymlora theory bound: error: cannot write to --output-dir {ro / 'out'}: "
                       f"Read-only file system ({ro})"]


def _check_full_disk(out, capsys, earlier: bytes) -> None:
    assert main(["theory", "bound", "-o", str(out), "--overwrite"]) == 1  # replacing the earlier table
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    assert err[0].startswith(f"asymlora theory bound: error: {out}/bound.") and \
        err[0].endswith(": No space left on device (files written before are left as they were)"), err
    assert (out / "bound.json").read_bytes() == earlier  # the complete earlier file survives
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]  # and no half-written one is left


def test_a_full_disk_is_one_line_and_the_earlier_file_survives(tmp_path, capsys):
    with tmpfs(tmp_path / "small") as out:
        earlier = json.dumps({"earlier": "complete", "pad": "x" * 3000}).encode()
        (out / "bound.json").write_bytes(earlier)
        fd = os.open(out / "filler", os.O_WRONLY | os.O_CREAT)  # fill the file system to the last block
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 1024)
        os.close(fd)
        _check_full_disk(out, capsys, earlier)


def test_a_full_disk_simulated_at_the_write(tmp_path, capsys, monkeypatch):
    """The same where no file system can be mounted: the temporary file's write fails with ENOSPC."""
    import asymlora.fileio as fio

    out = tmp_path / "out"
    out.mkdir()
    earlier = json.dumps({"earlier": str(uuid.uuid4())}).encode()
    (out / "bound.json").write_bytes(earlier)
    real = fio.atomic_path

    @contextlib.contextmanager
    def full(path):
        with real(path) as tmp:
            yield tmp
            with open(tmp, "ab") as fh:
                fh.write(b"more")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fio, "atomic_path", full)
    _check_full_disk(out, capsys, earlier)
