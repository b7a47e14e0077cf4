"""Recipes: the paper's experiments as YAML files (GLUE, summarization, instruction tuning,
DomainBed) and the families that prepare their data, models and metrics. ``asymlora run``."""
