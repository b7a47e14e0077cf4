"""The progress of one run: a bar on a terminal, or nothing (the sweeps print one line per run)."""
from __future__ import annotations

from asymlora.training.args import TrainArgs


class Progress:
    """The progress bar of the main process (nothing elsewhere, or with ``progress=False``)."""

    def __init__(self, args: TrainArgs, total: int, initial: int, show: bool) -> None:
        self.bar = None
        if args.progress and show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=args.desc, leave=False, dynamic_ncols=True)

    def log(self, rec: dict[str, float], last_eval: dict[str, float]) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}"}
        if last_eval:
            k0 = next(iter(last_eval))
            post[k0] = f"{last_eval[k0]:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
