"""sempa_dist.eval.harness: real lm-evaluation-harness runs on local multiple-choice tasks, no network.

The tasks are written here (yaml + jsonl read by the `json` dataset builder), so nothing is downloaded.
Their scores are checked against accuracies computed by hand from plain HF forwards of each choice's
log-likelihood, which proves the plumbing (right model per column, right few-shot context per task,
right metric per task), not merely that the harness ran. The labels are chosen after scoring, so that
the reference gets exactly half of each task right and the expected values are not 0 or 1.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e '.[dev]' installs it")

from sempa_dist.eval import harness  # noqa: E402 (after the skip: the module is only useful with lm-eval)

QUESTIONS = ["The cat sat on the", "Two dogs run through a", "A man is playing a", "The children are eating",
             "A woman rides her bike along the", "Someone is cooking", "The old bridge crosses the",
             "A bird sings in the"]
CHOICES = [["mat", "roof", "old chair by the door"], ["park", "field of grass", "river"],
           ["guitar", "game of chess", "song"], ["lunch", "ice cream outside", "apples"],
           ["river", "road", "quiet beach at night"], ["dinner", "pasta for friends", "eggs"],
           ["river", "valley below the town", "road"], ["tree", "garden", "morning light"]]
SHOT = {"question": "A man is walking his", "choices": ["dog", "bike"], "label": 0}  # the 1-shot task's example
ZERO, FEWSHOT = "sempa_tiny_zero", "sempa_tiny_shot"  # default (0) shots; run with :1


def task_yaml(name: str, data: Path, cache: Path, shot_file: Path | None = None) -> str:
    """A multiple-choice task over local jsonl files; with `shot_file`, few-shot examples come from it
    in file order (sampler first_n), so the 1-shot context is known without the harness's RNG."""
    files = {"test": str(data), **({"train": str(shot_file)} if shot_file else {})}
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", f"  cache_dir: {json.dumps(str(cache))}",
             "  data_files:", *[f"    {k}: {json.dumps(v)}" for k, v in files.items()], "test_split: test"]
    if shot_file:
        lines += ["fewshot_split: train", "fewshot_config:", "  sampler: first_n"]
    lines += ["output_type: multiple_choice", 'doc_to_text: "{{question}}"', 'doc_to_choice: "{{choices}}"',
              'doc_to_target: "{{label}}"', "metric_list:",
              "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
              "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true",
              "metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


def context(task: str, question: str) -> str:
    """The prompt the harness builds: the shot, the default fewshot delimiter, the question."""
    if task == FEWSHOT:
        return f"{SHOT['question']} {SHOT['choices'][SHOT['label']]}\n\n{question}"
    return question


@torch.no_grad()
def loglik(model, tokenizer, ctx: str, continuation: str) -> float:
    """log p(continuation | ctx) from one plain forward. The split is lm-eval's: tokenise the whole
    and the context, the continuation is what the whole has beyond the context's tokens."""
    whole = tokenizer(ctx + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
    logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def choice_logliks(model_dir: str | Path) -> dict[str, list[list[float]]]:
    """{task: per question, the log-likelihood of ' ' + each choice} (the default target delimiter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {task: [[loglik(model, tok, context(task, q), " " + c) for c in cs] for q, cs in zip(QUESTIONS, CHOICES, strict=True)]
            for task in (ZERO, FEWSHOT)}


def hand_scores(lls: list[list[float]], labels: list[int], n: int | None = None) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per character of the choice) over the first `n` questions."""
    n = n or len(labels)
    acc = acc_norm = 0
    for ll, cs, label in zip(lls[:n], CHOICES[:n], labels[:n], strict=True):
        acc += max(range(len(ll)), key=lambda i: ll[i]) == label
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / len(cs[i])) == label
    return {"acc": acc / n, "acc_norm": acc_norm / n}


def half_right_labels(lls: list[list[float]]) -> list[int]:
    """Labels on which these log-likelihoods get exactly every other question right."""
    best = [max(range(len(ll)), key=lambda i: ll[i]) for ll in lls]
    return [b if q % 2 == 0 else (b + 1) % len(ll) for q, (b, ll) in enumerate(zip(best, lls, strict=True))]


def perturbed_copy(model_dir: Path, out: Path) -> Path:
    """`model_dir` with noise on every weight (twice the init scale): another model, same tokenizer,
    made in well under a second (building a tiny model anew trains its tokenizer)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    gen = torch.Generator().manual_seed(1)
    weights = load_file(out / "model.safetensors")
    save_file({k: v + 0.04 * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> dict:
    """Two local tasks, a reference model (tiny-llama) and a 'trained' one (tiny-llama with other
    random weights, same tokenizer), and what each must score: {tasks_dir, models, expected, labels}."""
    from sempa_dist.models import resolve_model

    root = tmp_path_factory.mktemp("lm_eval_tasks")
    reference = resolve_model("tiny-llama")
    models = {"reference": str(reference), "trained": str(perturbed_copy(reference, root / "trained"))}
    lls = {label: choice_logliks(path) for label, path in models.items()}
    tasks_dir = root / "tasks"
    tasks_dir.mkdir()
    (root / "shots.jsonl").write_text(json.dumps(SHOT) + "\n")
    labels = {}
    for task in (ZERO, FEWSHOT):
        labels[task] = half_right_labels(lls["reference"][task])
        data = root / f"{task}.jsonl"
        data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                                for q, c, y in zip(QUESTIONS, CHOICES, labels[task], strict=True)))
        (tasks_dir / f"{task}.yaml").write_text(
            task_yaml(task, data, root / "hf_cache", root / "shots.jsonl" if task == FEWSHOT else None))
    return {"tasks_dir": tasks_dir, "models": models, "lls": lls, "labels": labels}


@pytest.fixture()
def no_env_report(monkeypatch):
    """Each harness call collects torch's environment report (a dozen subprocesses, seconds on a busy
    machine) for result metadata we drop; the tests skip it."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


def test_compare_matches_hand_computed_accuracy(local_tasks, no_env_report):
    specs = harness.parse_task_specs(f"{ZERO},{FEWSHOT}:1")
    report = harness.compare(local_tasks["models"], specs, tasks_dir=local_tasks["tasks_dir"], device="cpu")
    assert report["models"] == local_tasks["models"] and report["tasks"] == [ZERO, f"{FEWSHOT}:1"]
    assert report["n_shot"] == {ZERO: 0, FEWSHOT: 1}
    assert report["n_samples"] == {ZERO: len(QUESTIONS), FEWSHOT: len(QUESTIONS)}
    assert report["top_level"] == [ZERO, FEWSHOT]
    for label in ("reference", "trained"):
        for task in (ZERO, FEWSHOT):
            want = hand_scores(local_tasks["lls"][label][task], local_tasks["labels"][task])
            got = report["results"][label][task]
            assert got["acc"] == pytest.approx(want["acc"]) and got["acc_norm"] == pytest.approx(want["acc_norm"]), \
                (label, task, got, want)
            assert {"acc_stderr", "acc_norm_stderr"} <= set(got) and "sample_len" not in got
    # the labels were made so: the reference gets every other question right on both tasks
    assert report["results"]["reference"][ZERO]["acc"] == report["results"]["reference"][FEWSHOT]["acc"] == 0.5
    table = harness.format_table(report)
    lines = table.splitlines()
    assert lines[0] == "| task | n-shot | metric | reference | trained | change |"
    ref, tr = report["results"]["reference"][FEWSHOT], report["results"]["trained"][FEWSHOT]
    assert (f"| {FEWSHOT} | 1 | acc | {ref['acc']:.4f} ± {ref['acc_stderr']:.4f} | "
            f"{tr['acc']:.4f} ± {tr['acc_stderr']:.4f} | {tr['acc'] - ref['acc']:+.4f} |") in lines
    assert len(lines) == 2 + 2 * 2  # header, rule, acc and acc_norm of each task
    json.dumps(report)  # written as the CLI's JSON and logged as an MLflow artifact


@pytest.mark.parametrize(("text", "want"), [
    ("mmlu", [("mmlu", None)]),
    (" mmlu:5 , gsm8k_cot,hellaswag:0 ", [("mmlu", 5), ("gsm8k_cot", None), ("hellaswag", 0)]),
    ("paper", [("mmlu", 5), ("gsm8k_cot", 8), ("drop", 3), ("truthfulqa_mc1", 0), ("hellaswag", 0)]),
])
def test_parse_task_specs(text, want):
    assert [(s.name, s.num_fewshot) for s in harness.parse_task_specs(text)] == want


@pytest.mark.parametrize(("text", "needle"), [
    ("", "names no task"), (" , ", "names no task"), ("mmlu:five", "'five'"), ("mmlu:-1", "'-1'"),
    (":5", "no task name"), ("mmlu:5,mmlu:0", "named twice"),
])
def test_parse_task_specs_rejects(text, needle):
    with pytest.raises(harness.HarnessTaskError, match=needle):
        harness.parse_task_specs(text)


def test_paper_preset_is_the_cli_help_text():
    from sempa_dist.cli import eval as eval_cli

    assert eval_cli.PAPER_TASKS == harness.PAPER_TASKS == harness.PRESETS["paper"]


def test_missing_lm_eval_is_one_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(harness.LmEvalUnavailable) as exc:
        harness.require_lm_eval()
    assert str(exc.value) == "lm-evaluation-harness is not installed: pip install 'sempa-dist[lm-eval]'"


def test_unknown_task_is_named(local_tasks, monkeypatch):
    """A name neither the local directory nor the harness knows fails before any model loads (the
    harness's own index is faked: building it takes seconds and is the harness's business)."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager

    def fake(include_path=None, include_defaults=True, **kw):
        local = real(include_path=include_path, include_defaults=False, **kw)
        if include_defaults:
            local._all_tasks = [*local.all_tasks, "mmlu"]
        return local

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", fake)
    specs = harness.parse_task_specs(f"{ZERO},mmlu:5,no_such_task")
    with pytest.raises(harness.HarnessTaskError, match=r"unknown task\(s\) no_such_task: .* nor in "):
        harness.task_manager(specs, local_tasks["tasks_dir"])
    assert harness.task_manager(specs[:1], local_tasks["tasks_dir"]).all_tasks == [FEWSHOT, ZERO]  # local only
    with pytest.raises(harness.HarnessTaskError, match="not a directory"):
        harness.task_manager(specs, local_tasks["tasks_dir"] / "absent")


def test_results_flattening():
    results = {"mmlu": {"alias": "mmlu", "name": "mmlu", "sample_len": 14042, "acc,none": 0.25,
                        "acc_stderr,none": 0.01},
               "mmlu_stem": {"alias": " - stem", "acc,none": 0.2, "acc_stderr,none": "N/A"},
               "gsm8k_cot": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.02,
                             "exact_match,flexible-extract": 0.3}}
    flat = harness.flatten_results(results)
    assert flat == {"mmlu": {"acc": 0.25, "acc_stderr": 0.01}, "mmlu_stem": {"acc": 0.2},
                    "gsm8k_cot": {"exact_match/strict-match": 0.1, "exact_match_stderr/strict-match": 0.02,
                                  "exact_match/flexible-extract": 0.3}}
    assert harness.top_level(results, {"mmlu": ["mmlu_stem"], "mmlu_stem": []}) == ["mmlu", "gsm8k_cot"]
    report = {"results": {"reference": flat, "trained": flat}, "top_level": ["mmlu", "gsm8k_cot"],
              "n_shot": {"mmlu": 5, "gsm8k_cot": 8}}
    table = harness.format_table(report).splitlines()
    assert "| mmlu | 5 | acc | 0.2500 ± 0.0100 | 0.2500 ± 0.0100 | +0.0000 |" in table
    assert "| gsm8k_cot | 8 | exact_match/strict-match | 0.1000 ± 0.0200 | 0.1000 ± 0.0200 | +0.0000 |" in table
    assert "| gsm8k_cot | 8 | exact_match/flexible-extract | 0.3000 | 0.3000 | +0.0000 |" in table
    assert not any("mmlu_stem" in line or "stderr" in line for line in table)
    single = harness.format_table({**report, "results": {"model": flat}}).splitlines()
    assert single[0] == "| task | n-shot | metric | model |" and "| mmlu | 5 | acc | 0.2500 ± 0.0100 |" in single
    metrics = harness.mlflow_metrics(report)
    assert metrics["lm_eval/trained/gsm8k_cot/exact_match/strict-match"] == 0.1
    assert metrics["lm_eval/reference/mmlu_stem/acc"] == 0.2 and len(metrics) == 2 * 6


def test_one_harness_call_per_shot_count_rows_in_request_order(monkeypatch):
    """The harness takes one num_fewshot per call: tasks are grouped by count (one model load), and
    the rows come back in the order asked for, a tag's tasks where the tag was asked."""
    import lm_eval
    import lm_eval.models.huggingface

    calls, loads = [], []
    tag_members = {"my_tag": ["tag_a", "tag_b"]}

    def fake_evaluate(model, tasks, num_fewshot, **kw):
        calls.append((tasks, num_fewshot, kw["limit"], kw["task_manager"]))
        names = [m for t in tasks for m in tag_members.get(t, [t])]
        return {"results": {n: {"acc,none": 0.5} for n in names}, "group_subtasks": {},
                "n-shot": {n: num_fewshot or 0 for n in names},
                "n-samples": {n: {"original": 10, "effective": 3} for n in names}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **kw: loads.append(kw) or object())
    specs = harness.parse_task_specs("a:0,b:5,my_tag,c:0,d")
    out = harness.run_harness("some/model", specs, limit=3, manager="the manager", device="cpu", batch_size=4)
    assert calls == [(["a", "c"], 0, 3, "the manager"), (["b"], 5, 3, "the manager"),
                     (["my_tag", "d"], None, 3, "the manager")]
    assert loads == [{"pretrained": "some/model", "dtype": "float32", "device": "cpu", "batch_size": 4}]
    assert out["top_level"] == ["a", "b", "tag_a", "tag_b", "c", "d"]
    assert out["n_shot"] == {"a": 0, "c": 0, "b": 5, "tag_a": 0, "tag_b": 0, "d": 0}
    assert set(out["n_samples"].values()) == {3} and out["metrics"]["tag_b"] == {"acc": 0.5}
