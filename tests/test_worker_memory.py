"""What a sweep worker holds (docs/memory.md): a run's model shares the frozen base weights of
the worker's task instead of copying them, training it leaves the base untouched, and the heap
pages a finished run freed go back to the OS."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from asymlora.sweep.run_settings import run_copy


def _storages(model: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=64, num_labels=3))


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    lm = LlamaForCausalLM(cfg)
    lm.requires_grad_(False)
    return lm


def test_run_copy_shares_every_base_weight_but_the_private_ones():
    base = _bert()
    copy_ = run_copy(base, private=["classifier"])
    base_params = dict(base.named_parameters())
    for name, p in copy_.named_parameters():
        same = p.untyped_storage().data_ptr() == base_params[name].untyped_storage().data_ptr()
        assert same != name.startswith("classifier."), name  # shared, except the head
        assert p is not base_params[name]  # the run's own Parameter: requires_grad stays its own
        assert torch.equal(p, base_params[name])
        assert p.requires_grad == name.startswith("classifier.")
    assert all(p.requires_grad for p in base.parameters())  # the base's flags are untouched


def test_run_copy_of_a_tied_model_adds_no_weight_storage_and_stays_tied():
    base = _tied_llama()
    copy_ = run_copy(base)
    assert copy_.lm_head.weight is copy_.model.embed_tokens.weight
    params = {p.untyped_storage().data_ptr() for p in copy_.parameters()}
    assert params <= {p.untyped_storage().data_ptr() for p in base.parameters()}  # no second copy of any weight


def test_training_a_run_copy_leaves_the_base_untouched():
    from asymlora.core.config import AsymLoraConfig
    from asymlora.core.inject import wrap
    from asymlora.training.loop import TrainArgs, fit

    base = _bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = run_copy(base, private=["classifier"])
    with torch.no_grad():
        model.classifier.weight.normal_()  # the head is the run's: re-initialised in place
    wrap(model, AsymLoraConfig.preset("lora", r=2, seed=0, target_modules=["query", "value"],
                                      modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 64, (6,), generator=g), "labels": torch.tensor(i % 3)} for i in range(16)]

    def collate(items):
        return {"input_ids": torch.stack([it["input_ids"] for it in items]),
                "labels": torch.stack([it["labels"] for it in items])}

    fit(model, data, collate, TrainArgs(lr=1e-2, max_steps=3, batch_size=4, progress=False))
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in base.parameters())


class _Stop(Exception):
    pass


def _capture_fit(monkeypatch) -> dict:
    """Replace fit with one that records the model it is given and stops the run there."""
    from asymlora.training import loop

    seen: dict = {}

    def fake_fit(model, *args, **kwargs):
        seen["model"] = model
        raise _Stop

    monkeypatch.setattr(loop, "fit", fake_fit)
    return seen


def test_an_sft_run_adds_only_its_adapter_to_the_base_weights(monkeypatch):
    """The model an sft run trains holds the task's base weights, not a copy: its storages are
    the base's plus the adapter factors (r × d each)."""
    from asymlora.sft import SFTConfig
    from asymlora.sft import run as R
    from asymlora.sweep.config import StrategySpec

    base = _tied_llama()
    task = SimpleNamespace(lm=base, val_batches=[], train=[], collate=None)
    seen = _capture_fit(monkeypatch)
    cfg = SFTConfig(model="unused", target_modules=["q_proj", "v_proj"], mixed_precision="no", progress=False)
    with pytest.raises(_Stop):
        R.execute_run(task, StrategySpec("lora r=2", "lora", 2, 2), 0, 1e-3, cfg, desc="t")
    model = seen["model"]
    new = [p for p in model.parameters() if p.untyped_storage().data_ptr() not in _storages(base)]
    assert len(new) == 2 * 2 * 2  # A and B of q_proj and v_proj in 2 layers, nothing else
    assert sorted(tuple(p.shape) for p in new) == sorted([(2, 32)] * 4 + [(32, 2), (16, 2)] * 2)


def test_a_compare_run_copies_only_the_head(monkeypatch):
    from asymlora.compare import run as C
    from asymlora.compare.config import CompareConfig, StrategySpec

    base = _bert()
    ds = SimpleNamespace(lengths=lambda: [4] * 8)
    task = SimpleNamespace(base=base, head="classifier", num_labels=3, train_ds=ds, val_ds=ds, test_ds=ds,
                           collate=None)
    seen = _capture_fit(monkeypatch)
    cfg = CompareConfig(mixed_precision="no", progress=False)
    with pytest.raises(_Stop):
        C.execute_run(task, StrategySpec("lora r=2", "lora", 2, 2), 0, 1e-3, cfg, desc="t")
    model = seen["model"]
    base_st = _storages(base)
    head = {p.untyped_storage().data_ptr() for p in model.classifier.parameters()}
    frozen = {p.untyped_storage().data_ptr() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen <= base_st and not (head & base_st)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_memory_hands_a_fragmented_heap_back():
    """glibc keeps freed chunks below its mmap threshold in the heap; with small live blocks
    between them (what a training step leaves) none is at the top to trim, so RSS stays."""
    from asymlora.sweep.backends import release_freed_memory

    def rss() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

    big = torch.ones(4 * 2**20)  # 16 MB, mmapped; freeing it raises glibc's mmap threshold to 16 MB
    del big
    freed, kept = [], []
    for _ in range(50):
        freed.append(torch.ones(2**20))  # 4 MB each, now from the heap
        kept.append(torch.ones(1024))
    high = rss()
    del freed
    assert release_freed_memory()
    assert rss() < high - 150 * 2**20
