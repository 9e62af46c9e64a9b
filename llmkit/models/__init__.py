"""Models built from :mod:`llmkit.nn` and llmkit's fused ops.

* :class:`GPT` (with :class:`GPTConfig`, :class:`KVCache`): decoder-only, GPT-2
  architecture; KV-cache decoding through :func:`llmkit.ops.decode_attention`,
  ``generate()`` (greedy, temperature, top-k), ``GPT.from_hf`` for HuggingFace GPT-2
  weights. ``GPT(GPTConfig())`` is GPT-2 small with random weights.
* :class:`BERT` (with :class:`BERTConfig`): bidirectional encoder on
  :class:`llmkit.nn.TransformerEncoder`; ``BERT.from_hf`` for HuggingFace BERT weights.
"""

from .bert import BERT, BERTConfig, BERTOutput
from .gpt import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "BERT", "BERTConfig", "BERTOutput"]
