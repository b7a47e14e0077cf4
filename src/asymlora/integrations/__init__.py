"""Glue between asymlora and other training libraries.

Each submodule imports its library only when it is itself imported, so ``import asymlora``
never needs them: ``asymlora.integrations.trl`` (Hugging Face TRL's ``SFTTrainer`` and any
``transformers.Trainer``; install with ``pip install asymlora[trl]``).
"""
