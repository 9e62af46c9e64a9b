"""The one place the llmkit version lives (pyproject.toml reads it from here)."""

__version__ = "0.2.0"
