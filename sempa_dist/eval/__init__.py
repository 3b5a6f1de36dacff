"""Evaluation: STS (sentence embeddings) and the generation check."""

from sempa_dist.eval.encode import Encoder, normalize_sentence
from sempa_dist.eval.sts import evaluate_sts, load_task
from sempa_dist.sts_tasks import ALL_TASKS, STANDARD_TASKS, resolve_tasks

__all__ = ["ALL_TASKS", "STANDARD_TASKS", "Encoder", "evaluate_sts", "load_task", "normalize_sentence", "resolve_tasks"]
