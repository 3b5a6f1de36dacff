"""STS task names: which sets exist, the standard seven, their aliases and `resolve_tasks`.

Its own module, with no import beyond the standard library, because the config validates
``eval.tasks`` / ``eval.final_tasks`` with it and importing the config must stay light (no numpy,
scipy or torch, which `sempa_dist.eval.sts` and the `sempa_dist.eval` package load). It sits beside
the config, not inside `sempa_dist/eval/`, since importing any module of that package runs its
``__init__``, which loads the encoder (torch) and imports the config: a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

STANDARD_TASKS = ["sts12", "sts13", "sts14", "sts15", "sts16", "stsb-test", "sickr-test"]
ALL_TASKS = [*STANDARD_TASKS, "stsb-dev"]
ALIASES = {"stsb": "stsb-test", "sickr": "sickr-test", "sick-r": "sickr-test"}


def resolve_tasks(names: Sequence[str]) -> list[str]:
    """Expand 'all' and aliases, case-insensitively, dropping repeats; raise ValueError naming an
    unknown task."""
    out: list[str] = []
    for name in names:
        key = ALIASES.get(name.lower(), name.lower())
        expanded = STANDARD_TASKS if key == "all" else [key]
        for k in expanded:
            if k not in ALL_TASKS:
                raise ValueError(f"unknown STS task {name!r}; known: all, {', '.join(ALL_TASKS)} "
                                 f"(aliases: {', '.join(ALIASES)})")
            if k not in out:
                out.append(k)
    return out
