"""Seed-only files keep loading in future versions: a b-only adapter stores B and the seed, and its
frozen A is rebuilt on load (docs/design.md §5). A change in how A is drawn — our code, torch's
generator, LAPACK's QR — would make every such file refuse to load. ``tests/data/golden-b-only``
was written by asymlora 0.x (``write_golden`` below, run once) on the shapes of the bundled
all-MiniLM-L6-v2 (query and value of 6 layers, 384 -> 384, r=8, seed 0); the test rebuilds its A's
and demands them bit for bit, by the digest recorded here when the folder was written.

If this test fails after an upgrade, the promise in docs/library.md ("Compatibility of seed-only
files") is broken: restore the old drawing, or ship a reader for the old one; do not re-record."""
from __future__ import annotations

import hashlib
import os
import sys

import torch

from asymlora.formats.native import load_adapter, read_factors

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden-b-only")
# sha256 over the rebuilt A's (float32 bytes, layers in name order), recorded when the folder was written
A_DIGEST = "576d65848ab4122c468b4d93cfd1377d89d2469444c436c52ffc3e08be697ab8"  # = the real MiniLM's, checked then


def minilm_shaped_bert():
    """A BERT with the bundled MiniLM's layer names and shapes (weights irrelevant: A depends only on
    the seed, the layer name, the init and the shape)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                    intermediate_size=64, vocab_size=32, max_position_embeddings=16,
                                                    num_labels=5))


def a_digest(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name in sorted(factors):
        h.update(name.encode() + factors[name][0].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def write_golden(path: str = GOLDEN) -> str:  # pragma: no cover - run once, by hand
    """Write the golden folder (b-only r=8 seed 0 on query,value; B deterministic) and return the A digest."""
    import asymlora

    model = asymlora.wrap(minilm_shaped_bert(),
                          asymlora.AsymLoraConfig.preset("b-only", r=8, seed=0, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    asymlora.save_adapter(model, path)
    return a_digest(read_factors(path)[1])


def test_the_golden_b_only_adapter_rebuilds_the_same_a_bit_for_bit():
    meta, factors, _ = read_factors(GOLDEN)  # refuses when a rebuilt A misses its recorded fingerprint
    assert not any(e["A"]["stored"] for e in meta["layers"].values()), "the golden file must be seed-only"
    assert len(factors) == 12 and all(a.shape == (8, 384) for a, _ in factors.values())
    assert a_digest(factors) == A_DIGEST


def test_the_golden_adapter_loads_onto_the_model_and_computes_with_that_a():
    model = load_adapter(minilm_shaped_bert(), GOLDEN)
    layer = dict(model.named_modules())["bert.encoder.layer.0.attention.self.query"]
    a, b = layer.factors("default")
    golden_a, golden_b = read_factors(GOLDEN)[1]["bert.encoder.layer.0.attention.self.query"]
    assert torch.equal(a, golden_a) and torch.equal(b, golden_b)
    x = torch.randn(3, 384, dtype=torch.float64)
    scaling = layer.slots["default"].scaling
    expected = layer.base.weight.double() @ x.T + scaling * (golden_b.double() @ (golden_a.double() @ x.T))
    expected = expected.T + layer.base.bias.double()
    assert torch.allclose(layer(x.float()).double(), expected, atol=1e-5)


if __name__ == "__main__":  # pragma: no cover
    print(write_golden(sys.argv[1] if len(sys.argv) > 1 else GOLDEN))
