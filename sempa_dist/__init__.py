"""sempa-dist: distributed SemPA (sentence-level DPO for LLM sentence embeddings) on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
