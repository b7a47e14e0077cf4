"""Recipes: the paper's experiments as YAML files (GLUE, summarization, instruction tuning,
DomainBed) and the families that prepare their data, models and metrics. ``asymlora run``;
``results`` turns the run folders into the paper's tables (``asymlora results``)."""
