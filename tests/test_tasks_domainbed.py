"""DomainBed/ViT recipe end to end on a tiny config-built ViTForImageClassification."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from conftest import require  # noqa: E402

Image = require("PIL.Image")

from asymlora.cli.main import main  # noqa: E402
from asymlora.recipes import domainbed as D  # noqa: E402
from asymlora.recipes.base import load_recipe  # noqa: E402

DOMAINS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
CLASSES = ("bird", "car", "dog")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("domainbed")
    g = torch.Generator().manual_seed(0)
    for d_i, dom in enumerate(DOMAINS):
        for c_i, cls in enumerate(CLASSES):
            folder = root / "VLCS" / dom / cls
            folder.mkdir(parents=True)
            for k in range(5):
                arr = (torch.rand(20, 20, 3, generator=g) * 60 + 60 * c_i + 10 * d_i).clamp(0, 255).byte().numpy()
                ext = "png" if k % 2 else "jpg"
                Image.fromarray(arr).save(folder / f"{k}.{ext}")
    return root


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("vit")
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=7)
    torch.manual_seed(0)
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_split_holdout_is_seeded_partition():
    items = list(range(50))
    keep, out = D.split_holdout(items, 0.2, seed=3)
    assert len(out) == 10 and len(keep) == 40 and sorted(keep + out) == items
    assert D.split_holdout(items, 0.2, seed=3) == (keep, out)
    assert D.split_holdout(items, 0.2, seed=4) != (keep, out)
    with pytest.raises(ValueError, match="holdout_fraction"):
        D.split_holdout(items, 1.5, 0)


def test_envs_train_on_one_and_leave_one_out():
    r = load_recipe("domainbed-vit-b16").for_task("VLCS")
    assert D.envs_for("VLCS", list(DOMAINS), r) == (["LabelMe"], ["Caltech101", "SUN09", "VOC2007"])
    r2 = load_recipe("domainbed-vit-b16", ["task_overrides.VLCS.data_args={test_env: SUN09}"]).for_task("VLCS")
    assert D.envs_for("VLCS", list(DOMAINS), r2) == (["Caltech101", "LabelMe", "VOC2007"], ["SUN09"])
    r3 = load_recipe("domainbed-vit-b16", ["task_overrides.VLCS.data_args.train_envs=[Nowhere]"]).for_task("VLCS")
    with pytest.raises(ValueError, match="Nowhere"):
        D.envs_for("VLCS", list(DOMAINS), r3)


def _hits_by_hand(model_dir: Path, adapter: Path, root: Path) -> dict[str, list[bool]]:
    """Per domain folder, whether the base + saved adapter (its trained classifier among its
    modules) puts each image in its folder's class: one image per forward."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    from asymlora.formats.native import load_adapter

    model = ViTForImageClassification.from_pretrained(model_dir, num_labels=len(CLASSES),
                                                      ignore_mismatched_sizes=True)
    model = load_adapter(model, adapter).eval()
    processor = ViTImageProcessor.from_pretrained(model_dir)
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for dom in DOMAINS:
            hits[dom] = []
            for c_i, cls in enumerate(CLASSES):  # sorted names: the class index
                for f in sorted((root / dom / cls).iterdir()):
                    with Image.open(f) as im:
                        pixels = processor(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"]
                    hits[dom].append(int(model(pixel_values=pixels).logits[0].argmax()) == c_i)
            assert len(hits[dom]) == 15
    return hits


def test_domainbed_end_to_end(tmp_path, tiny_vit, data_dir):
    out = tmp_path / "runs"
    rc = main(["run", "domainbed-vit-b16", "--model", str(tiny_vit), "--data", str(data_dir), "--out", str(out),
               "--tasks", "VLCS", "--strategies", "b-only", "--rank", "2", "--seeds", "0", "1",
               "--max-steps", "2", "--batch-size", "4", "--mixed-precision", "no", "--no-progress"])
    assert rc == 0
    r = json.loads((out / "VLCS" / "b-only-r2" / "seed1" / "result.json").read_text())
    info = r["info"]
    assert info["train_envs"] == ["LabelMe"] and info["test_envs"] == ["Caltech101", "SUN09", "VOC2007"]
    assert info["classes"] == list(CLASSES)
    assert info["n_train"] == 12 and info["n_in_val"] == 3 and info["n_test"] == {d: 15 for d in info["test_envs"]}
    m = r["metrics"]
    # every accuracy against the saved adapter's own predictions, one image at a time, the true class
    # taken from the fixture's folders
    hits = _hits_by_hand(tiny_vit, out / "VLCS" / "b-only-r2" / "seed1" / "adapter", data_dir / "VLCS")
    for d in info["test_envs"]:
        assert m[f"acc/{d}"] == pytest.approx(sum(hits[d]) / 15), d
    assert m["ood_acc"] == pytest.approx(sum(sum(hits[d]) for d in info["test_envs"]) / 45)
    # the training domain: its 12 training and 3 held-out images are its 15 images, however split
    assert 12 * m["train_acc"] + 3 * m["id_acc"] == pytest.approx(sum(hits["LabelMe"]))
    assert m["gap"] == pytest.approx(m["train_acc"] - m["ood_acc"])
    assert m["id_ood_gap"] == pytest.approx(m["id_acc"] - m["ood_acc"])
    assert r["columns"] == {"VLCS ID": m["id_acc"], "VLCS OOD": m["ood_acc"], "VLCS gap": m["gap"]}
    assert r["adapter_config"]["modules_to_save"] == ["classifier"]
    # table: strategies as rows, mean ± std over the two seeds
    rc = main(["results", str(out), "-o", str(tmp_path / "t")])
    assert rc == 0
    md = (tmp_path / "t" / "results.md").read_text()
    assert "| b-only r=2 |" in md and "±" in md and "VLCS OOD" in md and "n = 2" in md


def test_missing_dataset_message(tmp_path, tiny_vit, capsys):
    rc = main(["run", "domainbed-vit-b16", "--model", str(tiny_vit), "--data", str(tmp_path), "--tasks", "PACS"])
    err = capsys.readouterr().err
    assert rc == 2 and "PACS" in err and "download" in err
