"""Issue 23 item 2a: an FP16 graph run segment by segment (one ONNX Runtime session at a time, so one
segment's FP32-upcast weights are in memory) computes what one session computes, within FP16 rounding;
under the same segmentation the exact checks stay exact (utility 0 = the bare graph, bit for bit); and
segment-major decoding (each session opened once for a prefill and its decode steps) equals step-by-step
decoding through one session."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from aim.families.from_checkpoint import checkpoint_family
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.modulate import deployment_graphs
from aim.layout import FILES
from aim.pipeline import steps
from aim.runtime.segments import Segmented
from aim.tasks import get_task
from aim.tasks.decoder_inputs import position_ids
from tests.export.test_fake_export import checkpoint, relative_error

BUDGET_MB = 0.1  # a tiny model's 2 layers in several segments


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("segments")
    folder = checkpoint(root / "checkpoint", tied=False)
    family = checkpoint_family(folder)
    task = get_task(family.task)
    exported, _ = steps.export_reduced(family, task, folder, root / "out" / FILES["exported"])
    made = deployment_graphs(load_onnx(exported), "logits", 1)
    verification = save_onnx(made["verification"], exported.with_name(FILES["verification"]))
    model = family.model_class_object().from_pretrained(folder)
    return exported, verification, task, task.example_inputs(model, family.sizes(**family.verify_sizes))


def feed_of(inputs) -> dict:
    return {name: tensor.numpy() for name, tensor in inputs.items()}


def test_segments_compute_what_one_session_computes(graphs):
    exported, _, _, inputs = graphs
    segmented = Segmented(exported, BUDGET_MB)
    assert len(segmented.segments) >= 4
    whole = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, feed_of(inputs))
    got = segmented.run(feed_of(inputs))
    assert relative_error(got["logits"], whole[0]) < 5e-3  # fp16 rounding at the cuts
    assert np.array_equal(got["logits"].argmax(-1), whole[0].argmax(-1))
    assert all(np.abs(got[name] - value).max() < 5e-2 for name, value in zip(segmented.outputs, whole))


def test_utility_zero_is_the_bare_graph_bit_for_bit_under_the_same_segmentation(graphs):
    exported, verification, _, inputs = graphs
    feed = feed_of(inputs)
    bare = Segmented(exported, BUDGET_MB).run(feed)["logits"]
    batch, classes = bare.shape
    knobs = {"utility": np.zeros(batch, np.float32), "focus": np.zeros((batch, classes), np.float32)}
    noise = {name: np.ones((batch, classes), np.float32) for name in ("noise_utility", "noise_focus")}
    modulated = Segmented(verification, BUDGET_MB).run({**feed, **knobs, **noise})["logits"]
    assert np.array_equal(modulated, bare)
    knobs["utility"][1] = 1.0  # the check can fail: a noisy row moves
    moved = Segmented(verification, BUDGET_MB).run({**feed, **knobs, **noise})["logits"]
    assert np.array_equal(moved[0], bare[0]) and not np.array_equal(moved[1], bare[1])


def test_segment_major_decoding_equals_decoding_step_by_step(graphs):
    exported, _, _, inputs = graphs
    feed = feed_of(inputs)
    pasts = {name: value[:, :, :0] for name, value in feed.items() if name.startswith("past_key_values.")}
    ids, mask = feed["input_ids"], np.ones_like(feed["input_ids"])
    forced = np.random.default_rng(0).integers(0, 512, (len(ids), 3))
    calls = [{"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask, ids.shape[1]), **pasts}]
    for step in range(forced.shape[1]):
        mask = np.ones((len(ids), mask.shape[1] + 1), np.int64)
        calls.append(
            {"input_ids": forced[:, step : step + 1], "attention_mask": mask, "position_ids": position_ids(mask, 1)}
        )
    segmented = Segmented(exported, BUDGET_MB)
    got = segmented.run_calls(calls)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    past = pasts
    for call, result in zip(calls, got):
        expected = dict(zip(segmented.outputs, session.run(None, {**call, **past})))
        past = {"past_key_values." + k.removeprefix("present."): v for k, v in expected.items() if k != "logits"}
        assert relative_error(result["logits"], expected["logits"]) < 5e-3
        assert np.array_equal(result["logits"].argmax(-1), expected["logits"].argmax(-1))


def test_a_build_whose_fp16_session_would_not_fit_is_verified_in_segments(tmp_path, monkeypatch):
    """The build's verification opens the FP16 graphs in segments when one session would not fit (forced
    here: a tiny model, 0.1 MB segments), and every check passes as it does with whole sessions: the exact
    ones included, and fresh noise at every call (the segment drawing it stays open)."""
    from aim.pipeline.builder import build
    from aim.pipeline.model_source import model_source
    from aim.pipeline.request import BuildRequest
    from aim.runtime import folder, segments

    opened = []

    class Counted(segments.SegmentedEngine):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(folder, "needs_segments", lambda path: True)
    monkeypatch.setattr(folder, "SegmentedEngine", Counted)
    monkeypatch.setattr(segments, "SEGMENT_MB", BUDGET_MB)
    source = model_source(None, checkpoint(tmp_path / "checkpoint", tied=False))
    manifest = build(source, BuildRequest(tmp_path / "out", precision="fp16"), lambda line: None).manifest
    assert manifest.verification.passed, [check.name for check in manifest.verification.checks if not check.passed]
    assert len(opened) >= 3  # bare, verification, production


def test_teacher_forced_generation_sweeps_the_segments_once_and_equals_decoding_call_by_call(graphs, monkeypatch):
    """The verification's teacher-forced runs (a prefill and its forced steps; then the KV check's
    prefills) know every input but the cache beforehand, so a segmented engine opens each segment's
    session once for all of them (at 7B a sweep costs ~105 s: 12 steps would cost 12 sweeps), and the
    logits are those of the same engine run call by call, bit for bit."""
    from aim.generation.loop import cached_and_recomputed, generate
    from aim.runtime import segments
    from aim.runtime.segments import SegmentedEngine

    exported, _, _, inputs = graphs
    segments._MEMO.clear()
    monkeypatch.setattr(segments, "KEEP_BYTES", 0)  # no segment stays open for its few weights, as at 7B
    ids = inputs["input_ids"].numpy()
    mask = np.ones_like(ids)
    forced = np.random.default_rng(1).integers(0, 512, (len(ids), 4))
    opened = []
    session = Segmented._session
    monkeypatch.setattr(Segmented, "_session", lambda self, model: opened.append(1) or session(self, model))

    engine = SegmentedEngine(exported, BUDGET_MB)
    together = generate(engine, ids, mask, max_new_tokens=4, forced=forced)
    sweep = len(engine.graph.segments)
    assert len(opened) <= sweep and together.tokens.tolist() == forced.tolist()

    class OneByOne:  # the same engine without infer_calls: one call at a time
        inputs = engine.inputs

        def infer(self, feed):
            return engine.infer(feed)

    opened.clear()
    segments._MEMO.clear()  # computed again, not remembered
    single = generate(OneByOne(), ids, mask, max_new_tokens=4, forced=forced)
    assert len(opened) > 2 * sweep  # (the count above can fail: call by call opens the sessions again)
    assert all(np.array_equal(a, b) for a, b in zip(together.logits, single.logits))

    opened.clear()
    cached, recomputed = cached_and_recomputed(engine, ids, mask, 3, tokens=forced)
    assert len(opened) <= 2 * sweep and cached.shape == recomputed.shape == (3, *together.logits[0].shape)
    assert np.array_equal(cached, np.stack(together.logits[:3]))
    assert relative_error(cached, recomputed) < 5e-3  # the cache and a recompute agree within fp16 rounding


@pytest.mark.parametrize("budget_mb", [BUDGET_MB, 0.05, 0.2])
def test_the_bare_and_the_modulated_graph_are_cut_alike(graphs, budget_mb):
    """The exact checks compare the bare graph with the modulated one under the same segmentation: their
    model parts must fall into the same segments, or ONNX Runtime fuses differently at the cuts and the
    bits move (a 7B build failed "identity at utility 0" so: the old order moved one node across every
    cut because the redistribution lengthened the logits' chain). Only the last segment, which holds the
    redistribution, may differ."""
    exported, verification, _, _ = graphs
    bare, modulated = Segmented(exported, budget_mb), Segmented(verification, budget_mb)
    model = {output for node in bare.model.graph.node for output in node.output}

    def cut(segmented):
        graph = segmented.model.graph
        return [{o for i in s for o in graph.node[i].output} & model for s in segmented.segments]

    assert len(bare.segments) >= 3
    assert cut(bare)[:-1] == cut(modulated)[: len(bare.segments) - 1]
