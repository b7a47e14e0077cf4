"""Your own adapter method as a row of ``asymlora compare``, refereed like ours: same seeds, its
own learning rate from the grid, a paired verdict against LoRA, the cost columns.

    asymlora compare --quick --strategies lora b-only \
        examples/custom_strategy.py:ia3 examples/custom_strategy.py:half_b_only

(or ``mypkg.mod:ia3`` for a module on your PYTHONPATH). A strategy is a factory
``(model, request) -> adapted model | PEFT config``; ``request`` says the rank, the run's seed
(draw every random factor from it, so rows are paired by seed), the target modules as given on
the command line (None: the architecture's default) and the task's head, which trains in every
row. Return a PEFT config and it is applied by PEFT, the head added to ``modules_to_save``;
return a model and everything you left trainable is trained (the head is made trainable too).
For full control (a rate scale, how the file is saved and loaded back) give an
``asymlora.strategies.Strategy`` instead.
"""
from __future__ import annotations

from torch import nn

import asymlora
from asymlora.strategies import AdaptRequest


def ia3(model: nn.Module, request: AdaptRequest):
    """PEFT's (IA)³, a method of PEFT's that asymlora does not register: one learned scaling
    vector per adapted layer (d_out numbers; it has no rank). Returned as a PEFT config."""
    from peft import IA3Config

    return IA3Config(target_modules=["query", "value"], feedforward_modules=[])


def half_b_only(model: nn.Module, request: AdaptRequest) -> nn.Module:
    """Our b-only at half the requested rank, built with asymlora's public API: the row asks
    whether r/2 trained columns of B are enough."""
    cfg = asymlora.AsymLoraConfig.preset("b-only", r=max(1, request.rank // 2), seed=request.seed,
                                         target_modules=request.targets,
                                         modules_to_save=[request.head] if request.head else None)
    return asymlora.wrap(model, cfg)
