"""Adapter files on disk: ``native`` (our format: B plus the seed that rebuilds a frozen A) and
``peft`` (PEFT's LoRA format, both ways)."""
