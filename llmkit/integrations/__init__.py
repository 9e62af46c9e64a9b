"""Integrations with other libraries.

* :mod:`llmkit.integrations.hf`: HuggingFace transformers: the ``"llmkit"`` attention
  implementation (registered with ``AttentionInterface`` without importing
  transformers at ``import llmkit``) and the module mapping ``llmkit.swap`` uses.
"""
