"""Evaluation: STS (sentence embeddings) and the generation check."""

from sempa_dist.eval.encode import Encoder, normalize_sentence
from sempa_dist.eval.sts import ALL_TASKS, STANDARD_TASKS, evaluate_sts, load_task, resolve_tasks

__all__ = ["ALL_TASKS", "STANDARD_TASKS", "Encoder", "evaluate_sts", "load_task", "normalize_sentence", "resolve_tasks"]
