"""How a process of the ``asymlora`` command starts (the command itself and the worker
processes a sweep spawns): offline, and without third-party start-up chatter.

Library code never calls this: importing or using ``asymlora`` leaves the environment and the
logging of the caller's process as they were.

The chatter: transformers imports torchao when it is installed (``transformers.quantizers``
does, on the first ``from_pretrained``), and accelerate's import of transformers' DeepSpeed glue
imports DeepSpeed. Merely having them installed then prints, before a command's own first line,
torchao's "Failed to load .../torchao/_C_*.so" (its optional CUDA kernels, on a CPU build of
torch), two torch pytree deprecation warnings (torchao registers Enum classes as pytree
constants), DeepSpeed's "Setting accelerator to CPU" on a machine without a GPU, and
bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (a kernel it tries
to download). Each is a ``logging`` record of a named logger; :func:`quiet_third_party` drops
exactly those messages and lets every other record of those loggers through.
"""
from __future__ import annotations

import logging
import os

__all__ = ["offline", "quiet_third_party", "no_loading_bars", "start_command_process"]

# logger name -> message fragments dropped from it (see the module docstring)
STARTUP_NOISE: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "DeepSpeed": ("Setting accelerator to CPU",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}


class StartupNoiseFilter(logging.Filter):
    """Drops the records whose message holds one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_third_party() -> None:
    """Install the filters of ``STARTUP_NOISE`` (once per process). Call it before the
    third-party packages are imported: a logger's filters survive the package's own set-up
    (DeepSpeed resets its logger's level and handlers on import, not its filters)."""
    for name, fragments in STARTUP_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, StartupNoiseFilter) for f in logger.filters):
            logger.addFilter(StartupNoiseFilter(fragments))


def offline() -> None:
    """Models and data come from local folders and caches only: ``HF_HUB_OFFLINE=1`` and
    ``TRANSFORMERS_OFFLINE=1`` unless the user set them. Processes this one starts inherit it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def no_loading_bars() -> None:
    """No hub or transformers progress bars: offline there is nothing to download, and what is
    left is transformers' "Loading weights" bar, which a causal LM prints before the command's
    first line and again from each worker. ``HF_HUB_DISABLE_PROGRESS_BARS=1`` (unless the user set
    it) reaches the processes this one starts before they import transformers; this process has
    imported it already, so its switch is turned here. The command's own bars (``--no-progress``)
    do not depend on either."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES  # how the hub itself reads the variable

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].upper() in ENV_VARS_TRUE_VALUES:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def start_command_process() -> None:
    """All of the above: the first thing ``asymlora`` and each of its worker processes do."""
    offline()
    quiet_third_party()
    no_loading_bars()
