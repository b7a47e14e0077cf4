"""DomainBed with ViT (paper Table 5): out-of-domain generalisation of the adapters.

Data: DomainBed's image-folder layout, ``<data>/<Dataset>/<domain>/<class>/*.jpg|png``
(``<data>`` may also be the dataset root itself). Dataset directories use DomainBed's
names (``VLCS``, ``PACS``, ``office_home``, ``terra_incognita``, ``domain_net``; the
CamelCase task names are accepted too).

Protocol: train on the domains in ``data_args.train_envs`` (the paper: ONE domain, e.g.
LabelMe for VLCS) — or leave-one-out with ``data_args.test_env`` (train on all the
others). Each training domain is split 80/20 (``holdout_fraction``, seeded by
``split_seed``) into train / in-domain validation. Reported: training-split accuracy,
in-domain validation accuracy (ID), accuracy on every held-out domain and their mean
(OOD), and the gaps train − OOD and ID − OOD.
"""
from __future__ import annotations

import random
from pathlib import Path

from asymlora.errors import MissingFileError, UserError
from asymlora.recipes.base import (
    Prepared,
    Recipe,
    RunOptions,
    limit,
    model_device,
    torch_dtype,
)

DATASETS: dict[str, tuple[str, ...]] = {
    # task name -> directory names to look for
    "VLCS": ("VLCS", "vlcs"),
    "PACS": ("PACS", "pacs"),
    "OfficeHome": ("office_home", "OfficeHome", "officehome"),
    "TerraIncognita": ("terra_incognita", "TerraIncognita"),
    "DomainNet": ("domain_net", "DomainNet"),
}
TASKS: tuple[str, ...] = tuple(DATASETS)
DATA_ARGS = ("train_envs", "test_env", "holdout_fraction", "split_seed")
EVAL_ARGS = ("eval_batch_size",)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
HINT = ("Download the DomainBed datasets (DomainBed's `python -m domainbed.scripts.download --data_dir DATA` "
        "on a machine with internet) so that DATA/<Dataset>/<domain>/<class>/<image> exists, and pass --data DATA.")


def dataset_root(task: str, data: str | Path) -> Path | None:
    data = Path(data)
    for name in DATASETS[task]:
        if (data / name).is_dir():
            return data / name
    # the data path itself is the dataset root: its subdirectories are domains holding class folders
    subdirs = [d for d in data.iterdir() if d.is_dir()] if data.is_dir() else []
    if subdirs and all(any(c.is_dir() for c in d.iterdir()) for d in subdirs):
        return data
    return None


def list_domains(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def envs_for(task: str, domains: list[str], recipe: Recipe) -> tuple[list[str], list[str]]:
    """(train domains, held-out domains) from data_args (train_envs, or test_env for leave-one-out)."""
    da = recipe.data_args
    if da.get("test_env") is not None and da.get("train_envs"):
        raise UserError(
            f"{task}: set either data_args.train_envs (train on those) or test_env (leave-one-out), not both"
        )
    if da.get("test_env") is not None:
        test = da["test_env"]
        test = [test] if isinstance(test, str) else list(test)
        for t in test:
            if t not in domains:
                raise UserError(f"{task}: test_env {t!r} is not a domain; domains: {domains}")
        return [d for d in domains if d not in test], test
    train = da.get("train_envs")
    if not train:
        raise UserError(f"{task}: data_args needs train_envs (e.g. [{domains[0]!r}]) or test_env; domains: {domains}")
    train = [train] if isinstance(train, str) else list(train)
    for t in train:
        if t not in domains:
            raise UserError(f"{task}: train_envs entry {t!r} is not a domain; domains: {domains}")
    return train, [d for d in domains if d not in train]


def check_data(task: str, data: str | Path, recipe: Recipe) -> None:
    root = dataset_root(task, data)
    if root is None:
        tried = " or ".join(str(Path(data) / n) for n in DATASETS[task])
        raise MissingFileError(f"DomainBed {task}: no dataset directory ({tried}). {recipe.data_hint or HINT}")
    domains = list_domains(root)
    if len(domains) < 2:
        raise MissingFileError(f"DomainBed {task}: {root} holds {len(domains)} domain folder(s); need >= 2")
    envs_for(task, domains, recipe)


def scan_domain(root: Path, domain: str, class_index: dict[str, int]) -> list[tuple[str, int]]:
    items = []
    for cdir in sorted((root / domain).iterdir()):
        if not cdir.is_dir() or cdir.name not in class_index:
            continue
        for f in sorted(cdir.rglob("*")):
            if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                items.append((str(f), class_index[cdir.name]))
    return items


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle; the first round(fraction·n) items are the holdout (in-domain validation)."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"holdout_fraction must be in (0, 1), got {fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_out = max(1, int(round(fraction * len(items)))) if len(items) > 1 else 0
    out = [items[i] for i in order[:n_out]]
    keep = [items[i] for i in order[n_out:]]
    return keep, out


class ImageCollator:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, batch: list[tuple[str, int]]) -> dict:
        import torch
        from PIL import Image

        images = []
        for path, _ in batch:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        enc = self.processor(images=images, return_tensors="pt")
        return {"pixel_values": enc["pixel_values"], "labels": torch.tensor([y for _, y in batch], dtype=torch.long)}


def accuracy_on(model, items: list[tuple[str, int]], collate: ImageCollator, batch_size: int) -> float:
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    hits = 0
    for i in range(0, len(items), batch_size):
        batch = collate(items[i : i + batch_size])
        logits = model(pixel_values=batch["pixel_values"].to(device=device, dtype=dtype)).logits
        hits += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
    return hits / max(1, len(items))


def prepare(task: str, model_path: str, data: str | Path, recipe: Recipe, opts: RunOptions) -> Prepared:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    root = dataset_root(task, data)
    assert root is not None
    domains = list_domains(root)
    train_envs, test_envs = envs_for(task, domains, recipe)
    classes = sorted({c.name for d in domains for c in (root / d).iterdir() if c.is_dir()})
    class_index = {c: i for i, c in enumerate(classes)}
    da = recipe.data_args
    frac, split_seed = float(da.get("holdout_fraction", 0.2)), int(da.get("split_seed", 0))
    train: list[tuple[str, int]] = []
    in_val: list[tuple[str, int]] = []
    for env in train_envs:
        keep, out = split_holdout(scan_domain(root, env, class_index), frac, split_seed)
        train += keep
        in_val += out
    if not train:
        raise UserError(f"DomainBed {task}: no training images in {train_envs}")
    random.Random(split_seed).shuffle(train)
    train = limit(train, opts.max_train_samples)
    n = opts.max_eval_samples
    tests = {env: limit(scan_domain(root, env, class_index), n) for env in test_envs}
    in_val = limit(in_val, n)
    try:
        processor = AutoImageProcessor.from_pretrained(model_path)
    except OSError as err:
        raise MissingFileError(f"{model_path}: no image processor config (preprocessor_config.json): {err}") from err
    collate = ImageCollator(processor)
    dtype = torch_dtype(opts.dtype or recipe.dtype)
    ebs = int(recipe.eval_args.get("eval_batch_size", 64))

    def build_model():
        return AutoModelForImageClassification.from_pretrained(
            model_path, num_labels=len(classes), id2label=dict(enumerate(classes)), label2id=class_index,
            ignore_mismatched_sizes=True, dtype=dtype)

    def evaluate(model) -> dict[str, float]:
        out = {"train_acc": accuracy_on(model, limit(train, n), collate, ebs),
               "id_acc": accuracy_on(model, in_val, collate, ebs) if in_val else float("nan")}
        for env, items in tests.items():
            out[f"acc/{env}"] = accuracy_on(model, items, collate, ebs)
        out["ood_acc"] = sum(out[f"acc/{e}"] for e in tests) / len(tests)
        out["gap"] = out["train_acc"] - out["ood_acc"]
        out["id_ood_gap"] = out["id_acc"] - out["ood_acc"]
        return out

    return Prepared(train, collate, build_model, evaluate,
                    info={"train_envs": train_envs, "test_envs": test_envs, "classes": classes,
                          "n_train": len(train), "n_in_val": len(in_val),
                          "n_test": {k: len(v) for k, v in tests.items()}})


def columns(task: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{task} ID": metrics["id_acc"], f"{task} OOD": metrics["ood_acc"], f"{task} gap": metrics["gap"]}


def avg_columns(task: str) -> list[str]:
    return []
