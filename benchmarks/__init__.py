"""Side-by-side benchmarks of asymlora against Hugging Face PEFT LoRA and the paper's code.

Run everything with ``python -m benchmarks.run`` (add ``--quick`` for a smoke run); see
BENCHMARKS.md for what is measured and the latest results.
"""
