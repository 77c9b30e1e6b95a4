"""The decode loop runs on a build's reference prompts once; the text task judges the arrays it gives."""

from __future__ import annotations

from aim.generation import load_build
from aim.generation.reference_runs import generation_runs
from aim.layout import REFERENCE
from aim.tasks import get_task
from aim.verify.reference import Reference

TASK = get_task("text-generation")


def test_the_checks_judge_the_runs_and_fail_on_a_wrong_token_or_a_stale_cache(build_folder):
    folder = build_folder("llama")
    engine, _, manifest = load_build(folder)
    extra = Reference.load(folder / REFERENCE).extra
    tolerance = manifest.verification.tolerance
    runs = generation_runs(engine, extra)
    assert runs["generation.cached"].shape == runs["generation.recomputed"].shape
    assert [check.passed for check in TASK.checks(runs, extra, tolerance)] == [True, True]

    wrong = dict(runs, **{"generation.1.tokens": runs["generation.1.tokens"].copy()})
    wrong["generation.1.tokens"][0, -1] += 1  # one token of one sequence off
    greedy, kv = TASK.checks(wrong, extra, tolerance)
    assert not greedy.passed and kv.passed and "batch 3 padded: DIFFER" in greedy.detail
    assert greedy.metrics["tokens_equal"] == greedy.metrics["tokens"] - 1

    stale = dict(runs, **{"generation.cached": runs["generation.cached"] + 2 * tolerance.atol})
    greedy, kv = TASK.checks(stale, extra, tolerance)
    assert greedy.passed and not kv.passed and kv.metrics["max_abs_diff"] > tolerance.atol


def test_a_reference_without_prompts_runs_nothing():
    """An image task's reference (or a user's ONNX) has no prompts: nothing to decode, no engine touched."""
    assert generation_runs(engine=None, extra={}) == {}
