"""Train an asymlora-wrapped model with TRL's ``SFTTrainer`` (or any ``transformers.Trainer``).

Wrap the model, then hand it to the trainer with an :class:`AsymLoraCallback` and *no*
``peft_config``::

    model = asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=8))
    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=data,
                         processing_class=tokenizer, callbacks=[AsymLoraCallback()])
    trainer.train()            # <output_dir>/asymlora_adapter holds the trained adapter

What the trainer does to the model it receives (TRL 1.16, transformers 5), and how it meets
asymlora:

- The optimizer gets every parameter with ``requires_grad``. A frozen factor is a buffer, not a
  parameter (``asymlora.core.layer``), so for b-only the optimizer holds exactly the B's. The callback
  checks, before the first step, that the optimizer's parameters are exactly the adapter's trained
  factors plus its ``modules_to_save``: a base weight unfrozen by other code would train but never
  reach the adapter file, and a ``peft_config`` would re-freeze the B's under a PEFT wrapper.
- Gradient checkpointing (on by default in ``SFTConfig``): transformers makes the embedding output
  require grad for ``input_ids`` models, so every checkpointed layer passes its gradient to the
  B's inside it, with ``use_reentrant`` True or False.
- TRL patches ``model.forward`` with a fused LM head that multiplies the hidden states by
  ``lm_head.weight`` itself; an adapter on the output layer would be silently skipped. Such a
  model is refused (``"all-linear"`` never adapts the output layer).
- ``completion_only_loss`` (prompt/completion data) and ``assistant_only_loss`` (chat
  ``messages``, whose chat template marks the reply with ``{% generation %}``) only change the
  labels; nothing here depends on them.
- ``SFTConfig`` defaults to ``bf16=True``, also on CPU: training runs under bf16 autocast and
  the trained model's ``forward`` stays wrapped in it afterwards. The trained factors stay
  float32 (autocast casts activations, not parameters), but the in-memory model's logits then
  differ (~1e-3) from a float32 reload of the adapter; pass ``bf16=False`` for float32 training.
  The trainer also sets ``model.config.use_cache`` to ``TrainingArguments.use_cache`` (False by
  default): set it back to True to generate with the KV cache.
- Saving: the trainer writes the whole wrapped model's state dict (``model.safetensors``, keys
  ``...q_proj.base.weight`` / ``...q_proj.lora_B``); ``resume_from_checkpoint`` reloads it into a
  wrapped model, but it is no adapter. The callback writes an asymlora adapter folder into every
  checkpoint (``checkpoint-N/asymlora_adapter``) and, when training ends,
  ``<output_dir>/asymlora_adapter``; ``asymlora.load_adapter`` reloads it and
  ``asymlora.formats.peft.convert_to_peft`` turns it into a PEFT LoRA folder. It is a subfolder because an
  ``adapter_config.json`` beside a checkpoint's ``config.json`` would be taken for an embedded
  PEFT adapter by ``AutoModel*.from_pretrained``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from accelerate.utils import is_peft_model
from torch import nn
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from asymlora.core.inject import (
    adapter_configs,
    adapter_state,
    lora_layers,
    output_head_names,
    saved_modules_of,
)
from asymlora.core.layer import factor_key
from asymlora.errors import UserError
from asymlora.formats.native import save_adapter

__all__ = ["ADAPTER_DIR", "AsymLoraCallback", "adapter_trainable_parameters", "check_for_trainer"]

ADAPTER_DIR = "asymlora_adapter"


def adapter_trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter for what the adapter trains and saves: the trained factors of
    the active adapters and the parameters of their ``modules_to_save``."""
    configs = adapter_configs(model)  # UserError for a model without adapters
    out: dict[str, nn.Parameter] = {}
    for layer_name, layer in lora_layers(model).items():
        for adapter in layer.active:
            for factor in ("A", "B"):
                value = layer.factor(adapter, factor)
                if isinstance(value, nn.Parameter):
                    out[f"{layer_name}.{factor_key(factor, adapter)}"] = value
    for adapter in adapter_state(model).asymlora_active:
        for module_name, module in saved_modules_of(model, configs[adapter].modules_to_save).items():
            for p_name, p in module.named_parameters():
                out[f"{module_name}.{p_name}"] = p
    return out


def check_for_trainer(model: nn.Module, optimizer: Any | None = None) -> None:
    """Refuse (UserError) a model that a ``transformers.Trainer`` / TRL ``SFTTrainer`` would train
    other than its asymlora adapter says.

    - no asymlora adapter, several active adapters, or a PEFT model (a ``peft_config`` given to
      the trainer);
    - an adapter on the output layer (TRL's fused LM head reads ``lm_head.weight`` directly);
    - with ``optimizer``: its parameters must be exactly :func:`adapter_trainable_parameters`
      (nothing more: it would train but not be saved; nothing less: it would be saved untrained).
    """
    if is_peft_model(model):
        raise UserError("the trainer's model is a PEFT model: give SFTTrainer the asymlora-wrapped model and no "
                        "peft_config (PEFT would freeze asymlora's trained factors)")
    expected = adapter_trainable_parameters(model)
    active = adapter_state(model).asymlora_active
    if len(active) != 1:
        raise UserError(f"{len(active)} adapters are active ({list(active)}); the "
                        "callback saves one: asymlora.adapters.set_adapter(model, name) before building the trainer")
    heads = output_head_names(model) & set(lora_layers(model))
    if heads:
        raise UserError(f"layer {sorted(heads)[0]!r} is the output layer: TRL's fused LM head multiplies by its base "
                        "weight directly, so an adapter there would never train; leave it out of target_modules")
    if optimizer is None:
        return
    held = {id(p) for p in _optimizer_parameters(optimizer)}
    names = {id(p): n for n, p in model.named_parameters()}
    expected_ids = {id(p) for p in expected.values()}
    extra = sorted(names.get(i, "<a tensor that is not a parameter of the model>") for i in held - expected_ids)
    if extra:
        raise UserError(f"the optimizer trains {len(extra)} parameter(s) that are not part of the asymlora adapter, "
                        f"e.g. {extra[0]!r}: they would not be saved. "
                        "Call asymlora.core.inject.mark_only_adapters_trainable(model) "
                        "before building the trainer, or list their module in modules_to_save")
    missing = sorted(n for n, p in expected.items() if id(p) not in held)
    if missing:
        raise UserError(f"the optimizer does not train {len(missing)} trained factor(s) of the adapter, e.g. "
                        f"{missing[0]!r} (requires_grad={expected[missing[0]].requires_grad}); call "
                        "asymlora.core.inject.mark_only_adapters_trainable(model) before building the trainer")


def _optimizer_parameters(optimizer: Any) -> Iterable[nn.Parameter]:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    return (p for group in inner.param_groups for p in group["params"])


class AsymLoraCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that checks the model before the first step
    (:func:`check_for_trainer`) and saves the asymlora adapter with every trainer checkpoint
    (``<output_dir>/checkpoint-N/<subdir>``) and at the end of training (``<output_dir>/<subdir>``).

    ``subdir`` names the adapter folder (default ``asymlora_adapter``); ``store_frozen`` also
    stores the seed-rebuilt frozen factors (see ``asymlora.save_adapter``). Only the main process
    writes. The final folder is written at ``on_train_end``: ``trainer.save_model()`` itself
    writes the trainer's own files, not an adapter (call ``asymlora.save_adapter`` for another
    place).
    """

    def __init__(self, subdir: str = ADAPTER_DIR, store_frozen: bool = False) -> None:
        if not isinstance(subdir, str) or not subdir or os.path.isabs(subdir) or ".." in subdir.split(os.sep):
            raise UserError(f"AsymLoraCallback subdir {subdir!r} is invalid: give a folder name relative to the "
                            "trainer's output_dir, e.g. 'asymlora_adapter'")
        self.subdir = subdir
        self.store_frozen = store_frozen

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        check_for_trainer(_required(model), optimizer)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        checkpoint = os.path.join(_output_dir(args), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero:
            if not os.path.isdir(checkpoint):
                raise RuntimeError(f"AsymLoraCallback: the trainer saved step {state.global_step} but "
                                   f"{checkpoint!r} does not exist (hyperparameter search runs are not supported)")
            save_adapter(_required(model), os.path.join(checkpoint, self.subdir), store_frozen=self.store_frozen)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            save_adapter(_required(model), os.path.join(_output_dir(args), self.subdir), store_frozen=self.store_frozen)


def _output_dir(args: TrainingArguments) -> str:
    """transformers types ``output_dir`` Optional; ``TrainingArguments`` fills in a default."""
    if args.output_dir is None:
        raise RuntimeError("AsymLoraCallback needs the trainer's output_dir")
    return args.output_dir


def _required(model: nn.Module | None) -> nn.Module:
    if model is None:
        raise UserError(
            "AsymLoraCallback needs the trainer to pass model= to its callbacks (transformers.Trainer does)"
        )
    return model
