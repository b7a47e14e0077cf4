"""The README keeps its promises: the quick start runs exactly as printed, the page stays short
enough to read in five minutes, and no relative link in it or in docs/ points at nothing."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 200

# [text](target) in Markdown, and the target of <img src="..."> / <a href="..."> if any appear.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|(?:src|href)=\"([^\"]+)\"")


def quick_start_code(text: str) -> str:
    """The first ```python block after the heading "Quick start"."""
    m = re.search(r"^#+ Quick start\b.*?^```python\n(.*?)^```", text, flags=re.M | re.S)
    if m is None:
        raise AssertionError("README.md has no ```python block under a 'Quick start' heading")
    return m.group(1)


def relative_links(markdown: Path) -> list[str]:
    """Every link target of a Markdown file that is a path in this repository (not a URL, not a
    same-page anchor), without its #anchor; links inside code blocks are not links."""
    text = re.sub(r"^```.*?^```", "", markdown.read_text(encoding="utf-8"), flags=re.M | re.S)
    targets = []
    for m in _LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_quick_start_extraction_finds_the_block_under_its_heading():
    text = "# x\n```python\nnot this\n```\n## Quick start\nprose\n```bash\nnor this\n```\n```python\nthis\n```\n"
    assert quick_start_code(text) == "this\n"
    with pytest.raises(AssertionError):
        quick_start_code("# x\n```python\nno heading\n```\n")


def test_relative_links_skip_urls_anchors_and_code(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("[a](docs/x.md#s) [b](https://e.org/y) [c](#here) ![d](img/p.png)\n"
                  "```\n[e](in/code.md)\n```\n[f](../up.md \"title\")\n", encoding="utf-8")
    assert relative_links(md) == ["docs/x.md", "img/p.png", "../up.md"]


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it within {MAX_README_LINES} (details go to docs/)"


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_points_to_a_file(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to paths that do not exist: {missing}"


@pytest.mark.slow
@pytest.mark.needs_assets("minilm", "fortunes")
def test_quick_start_runs_as_written(tmp_path):
    code = quick_start_code(README.read_text(encoding="utf-8"))
    assert len(code.strip().splitlines()) <= 8, "the quick start should stay within 8 lines"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    folders = sorted(p.parent for p in tmp_path.rglob("adapter_config.json"))
    kinds = {f.name: json.loads((f / "adapter_config.json").read_text()).get("peft_type") for f in folders}
    assert sorted(kinds.values(), key=str) == ["LORA", None], f"expected our adapter and a PEFT folder: {kinds}"
    for folder in folders:
        keys = safe_open(str(folder / "adapter_model.safetensors"), "pt").keys()
        has_a = any("lora_A" in k for k in keys)
        # b-only: our file keeps B and the seed (A is rebuilt), PEFT's has A written out in full
        assert has_a == (kinds[folder.name] == "LORA"), (folder.name, sorted(keys)[:4])
        assert any("lora_B" in k for k in keys)

    # the two files are one adapter: ours loaded by asymlora and the export loaded by PEFT itself
    # compute the same logits, and both differ from the base with the same head (B was trained)
    import torch

    import asymlora
    from asymlora.compare.task import bundled_classifier
    from conftest import require

    peft = require("peft")
    ours, data, collate = bundled_classifier("fortunes")
    theirs, untuned = bundled_classifier("fortunes")[0], bundled_classifier("fortunes")[0]
    asymlora.load_adapter(ours, str(tmp_path / "out" / "adapter"))
    theirs = peft.PeftModel.from_pretrained(theirs, str(tmp_path / "out" / "peft"))
    batch = {k: v for k, v in collate([data[i] for i in range(16)]).items() if k != "labels"}
    with torch.no_grad():
        a, b = ours.eval()(**batch).logits, theirs.eval()(**batch).logits
        untuned.classifier.load_state_dict(ours.classifier.state_dict())  # the trained head, no adapter
        c = untuned.eval()(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert float((a - c).abs().max()) > 1e-4


def test_examples_quickstart_is_the_readme_quick_start():
    def lines(text: str) -> list[str]:  # the example may add blank lines (import grouping) and a docstring
        return [line for line in text.splitlines() if line.strip()]

    readme = lines(quick_start_code(README.read_text(encoding="utf-8")))
    example = lines((ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8"))
    assert example[-len(readme):] == readme
