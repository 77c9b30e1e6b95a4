"""The real Triton server (nvidia-pytriton's 2.51) serving the generated repository, over HTTP and gRPC.

The references are ONNX Runtime runs of the bare (unmodulated) model of the same build: utility 0 and
focus 0 must give those logits exactly, also inside a dynamic batch shared with noisy requests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from scipy.stats import norm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from aim.layout import Manifest
from aim.runtime.onnxruntime import OnnxRuntimeEngine

PROTOCOLS = {"http": httpclient, "grpc": grpcclient}
IMAGES = 32  # resnet requests: 32 random 32x32 images (the profile's max batch)
# A keyed row in a batch against the same row alone. The logits move by float rounding with the batch
# (another kernel blocking: <= ~1e-6 for these models' logits). The cell digest (pixels, tokens) is
# constant within a cell and passes that on as it is; the smooth keyed noise of rows is continuous in
# the logits and passes it on with a slope measured at <= 55 for 10 classes and <= 110 for 1,000
# (perturbations of 2e-7, 200 rows each, noise.SmoothKeyedNoise at utility 2), so 1e-6 x 200.
# Another row's answer lies >= 100 times farther than the tolerance (checked).
FLOAT_BATCH_ATOL, SMOOTH_NOISE_SLOPE = 1e-6, 200


@pytest.fixture(scope="module")
def clients(triton):
    http = httpclient.InferenceServerClient(triton.http_url)
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    yield {"http": http, "grpc": grpc}
    http.close()
    grpc.close()


class Model:
    """A served model's sample inputs and its bare logits from ONNX Runtime."""

    def __init__(self, folder, inputs):
        self.manifest = Manifest.load(folder)
        self.name = self.manifest.model
        self.classes = self.manifest.modulation.num_classes
        self.inputs = inputs
        self.bare = OnnxRuntimeEngine(self.manifest.path("bare")).run(inputs)

    def rows(self, index):
        return {name: array[index] for name, array in self.inputs.items()}


@pytest.fixture(scope="module")
def models(build_folder):
    rng = np.random.default_rng(0)
    images = {"pixel_values": rng.normal(size=(IMAGES, 3, 32, 32)).astype(np.float32)}
    ids = rng.integers(0, 32000, size=(8, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # a left-padded prompt, as batched generation sends
    return {
        "resnet": Model(build_folder("resnet"), images),
        "llama": Model(build_folder("llama"), prefill(build_folder("llama"), ids, mask)),
    }


def prefill(folder, ids, mask) -> dict:
    """A prefill request of the KV-cache export: the prompts, their positions and an empty cache."""
    from aim.tasks.decoder_inputs import PAST, position_ids

    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask, ids.shape[1])}
    for tensor in Manifest.load(folder).graph.inputs:
        if tensor.name.startswith(PAST):
            _, heads, _, head_dim = tensor.dims
            inputs[tensor.name] = np.zeros((len(ids), heads, 0, head_dim), np.float32)
    return inputs


def _tensors(module, inputs: dict):
    tensors = []
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        tensors.append(tensor)
    return tensors


def request(model: Model, index=slice(None), utility=0.0, focus=None) -> dict:
    """Inputs of one request: model inputs, utility [b, 1], focus [b, C] (per sample, as Triton sends)."""
    inputs = model.rows(index)
    batch = next(iter(inputs.values())).shape[0]
    u = np.broadcast_to(np.asarray(utility, np.float32).reshape(-1, 1), (batch, 1))
    f = (
        np.zeros((batch, model.classes), np.float32)
        if focus is None
        else np.broadcast_to(np.asarray(focus, np.float32), (batch, model.classes))
    )
    return {**inputs, "utility": u, "focus": f}


def infer(protocol, client, model: Model, inputs: dict) -> np.ndarray:
    module = PROTOCOLS[protocol]
    result = client.infer(model.name, _tensors(module, inputs), outputs=[module.InferRequestedOutput("logits")])
    return result.as_numpy("logits")


def test_the_server_loads_the_generated_repository(triton, clients):
    assert triton.models_ready() == [
        "llama",
        "llama-keyed",
        "llama-text",
        "resnet",
        "resnet-bare",
        "resnet-keyed",
        "segformer-keyed",
    ]
    assert "successfully loaded 'resnet'" in triton.log()
    config = clients["http"].get_model_config("resnet")  # as the server read it
    assert config["backend"] == "python" and config["max_batch_size"] == 32  # the front holds the engine
    assert [(i["name"], i.get("optional", False)) for i in config["input"]] == [
        ("pixel_values", False),
        ("utility", False),
        ("focus", True),  # the user's knob: absent = no focus
    ]
    assert clients["grpc"].is_model_ready("llama")


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("name", ["resnet", "llama"])
def test_utility_zero_focus_zero_is_the_bare_model_exactly(clients, models, protocol, name):
    model = models[name]
    logits = infer(protocol, clients[protocol], model, request(model))
    assert logits.dtype == np.float32 and logits.shape == model.bare.shape
    assert np.array_equal(logits, model.bare)  # bit for bit: no noise is added at utility 0
    single = infer(protocol, clients[protocol], model, request(model, slice(1, 2)))
    assert np.array_equal(single, model.bare[1:2])
    noisy = infer(protocol, clients[protocol], model, request(model, utility=[0.0] + [3.0] * (len(model.bare) - 1)))
    assert np.array_equal(noisy[0], model.bare[0]) and np.mean(noisy[1:] != model.bare[1:]) > 0.99


def test_every_model_runs_its_instances_and_the_bare_entry_is_the_bare_model(triton, clients, models):
    """`instances` reaches the server: it initialises that many instances of each model (its own log
    says so, one line per instance). The bare entry serves the bare model: the bare logits bit for bit,
    as the modulated model gives them at utility 0."""
    from tests.serving.conftest import INSTANCES

    log = triton.log()
    for name in ("resnet", "llama", "resnet-bare"):
        started = [
            f"TRITONBACKEND_ModelInstanceInitialize: {name}_0_{k} (CPU device 0)" in log for k in range(INSTANCES + 1)
        ]
        assert started == [True] * INSTANCES + [False], (name, started)
    assert clients["grpc"].get_model_config("resnet-bare").config.instance_group[0].count == INSTANCES
    model = models["resnet"]
    for protocol in sorted(PROTOCOLS):
        module = PROTOCOLS[protocol]
        result = clients[protocol].infer(
            "resnet-bare", _tensors(module, model.inputs), outputs=[module.InferRequestedOutput("logits")]
        )
        assert np.array_equal(result.as_numpy("logits"), model.bare)
        assert np.array_equal(infer(protocol, clients[protocol], model, request(model)), result.as_numpy("logits"))


class TritonEngine:
    """The decode loop's engine interface (`inputs`, `infer(feed)`) over a Triton client: generation is
    backend-agnostic, so text decodes through the server exactly as through ONNX Runtime."""

    def __init__(self, protocol, client, folder):
        self.module, self.client = PROTOCOLS[protocol], client
        self.manifest = Manifest.load(folder)
        types = {"float32": np.float32, "int64": np.int64}
        self.inputs = {t.name: (types[t.dtype], t.dims) for t in self.manifest.graph.inputs}
        self.outputs = [t.name for t in self.manifest.graph.outputs]

    def infer(self, feed):
        feed = dict(feed, utility=np.asarray(feed["utility"], np.float32).reshape(-1, 1))  # Triton: [b, 1] per request
        result = self.client.infer(
            self.manifest.model,
            _tensors(self.module, feed),
            outputs=[self.module.InferRequestedOutput(n) for n in self.outputs],
        )
        return {name: result.as_numpy(name) for name in self.outputs}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_generation_through_the_server_equals_onnx_runtime(clients, build_folder, protocol):
    """Greedy decoding with the KV cache through Triton (prefill, then one token per step with the
    returned present.* as past) gives ONNX Runtime's tokens; a boosted token takes over in both."""
    from aim.generation import generate

    folder = build_folder("llama")
    served = TritonEngine(protocol, clients[protocol], folder)
    local = OnnxRuntimeEngine(served.manifest.engine_path())
    prompts = [[5, 900, 17, 4242, 31000], [18, 2], [400, 401, 402]]
    expected = generate(local, prompts, max_new_tokens=6).tokens
    np.testing.assert_array_equal(generate(served, prompts, max_new_tokens=6).tokens, expected)
    focus = np.zeros(32000, np.float32)
    focus[7] = 1e3  # |n| * 1e3 beats the top logit (gaps below ~1) unless |n| < 1e-3: P < 1e-3 per step
    boosted = generate(served, prompts, max_new_tokens=4, focus=focus).tokens
    # 12 steps: 3 or more misses happen with P ~ C(12, 3) * (1e-3)^3 ~ 2e-7, so the test never cries wolf,
    # while a focus that did not reach the server leaves token 7 out (a random 32,000-way choice).
    assert np.sum(boosted == 7) >= 10, boosted


def _binomial_bound(p: np.ndarray, repeats: int) -> tuple[float, float]:
    mean, var = repeats * p.sum(), repeats * (p * (1 - p)).sum()
    return mean, 5 * np.sqrt(var) + 1  # 5 sigma: a correct server fails this far less than once in a million runs


@pytest.mark.parametrize("name, protocol", [("resnet", "grpc"), ("llama", "http")])
def test_boost_and_suppress_follow_the_theory(clients, models, name, protocol):
    """docs/method.md §3: boosting class k with strength w makes it win with probability 2 (1 - Phi(m / w))
    (m: its margin to the top); suppressing the top class keeps it on top with probability 2 Phi(g / w) - 1."""
    model, repeats = models[name], 8
    z = model.bare
    top = z.argmax(axis=1)
    # boost: the class that is top least often (for llama: a fixed token)
    k = int(np.bincount(top, minlength=model.classes).argmin()) if model.classes < 100 else 7
    margin = np.delete(z, k, axis=1).max(axis=1) - z[:, k]
    w = float(np.median(margin[margin > 0]))
    p_boost = np.where(margin <= 0, 1.0, 2 * (1 - norm.cdf(margin / w)))
    focus = np.zeros(model.classes, np.float32)
    focus[k] = w
    wins = sum(
        int(np.sum(infer(protocol, clients[protocol], model, request(model, focus=focus)).argmax(1) == k))
        for _ in range(repeats)
    )
    expected, bound = _binomial_bound(p_boost, repeats)
    assert abs(wins - expected) <= bound, (wins, expected, bound)
    assert wins > repeats * np.sum(top == k) + 0.1 * repeats * len(z)  # it does win more often than unboosted

    # suppress each sample's own top class: one focus vector per sample in the same request
    ordered = np.sort(z, axis=1)
    gap = ordered[:, -1] - ordered[:, -2]
    w = float(np.median(gap))
    per_sample = np.zeros_like(z)
    per_sample[np.arange(len(z)), top] = -w
    kept = sum(
        int(np.sum(infer(protocol, clients[protocol], model, request(model, focus=per_sample)).argmax(1) == top))
        for _ in range(repeats)
    )
    expected, bound = _binomial_bound(2 * norm.cdf(gap / w) - 1, repeats)
    assert abs(kept - expected) <= bound, (kept, expected, bound)


def _counts(client, name):
    stats = client.get_inference_statistics(name)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def _counted(client, name, before, requests: int, wait_s: float = 10.0):
    """(inferences, executions) since `before`, once the server has counted all `requests`: Triton
    updates its statistics after it sends a batch's responses, so the last ones may lag a little."""
    deadline = time.monotonic() + wait_s
    while True:
        inferences, executions = (after - first for after, first in zip(_counts(client, name), before))
        if inferences >= requests or time.monotonic() > deadline:
            return inferences, executions
        time.sleep(0.05)


def test_64_concurrent_requests_are_batched_and_utility_zero_stays_exact(clients, models):
    """Isolation under dynamic batching: requests of mixed utility share batches on the server, and
    each response is its own: utility-0 responses are the bare logits bit for bit, the others carry
    noise of their own scale."""
    model, client = models["resnet"], clients["grpc"]
    levels = [0.0, 0.5, 2.0, 10.0]
    before = _counts(clients["http"], model.name)
    results, errors, done = {}, {}, threading.Semaphore(0)

    def callback(index, result, error):
        if error is not None:
            errors[index] = error
        else:
            results[index] = result.as_numpy("logits")
        done.release()

    for index in range(64):
        inputs = request(model, slice(index % IMAGES, index % IMAGES + 1), levels[index % len(levels)])
        client.async_infer(
            model.name, _tensors(grpcclient, inputs), lambda result, error, i=index: callback(i, result, error)
        )
    for _ in range(64):
        assert done.acquire(timeout=60), "a response did not arrive within 60 s"
    assert not errors, errors
    inferences, executions = _counted(clients["http"], model.name, before, 64)
    assert inferences == 64
    assert executions < inferences, f"no dynamic batching: {executions} executions for {inferences} requests"

    scaled = {level: [] for level in levels[1:]}
    for index, logits in results.items():
        level, bare = levels[index % len(levels)], model.bare[index % IMAGES][None]
        if level == 0:
            assert np.array_equal(logits, bare), f"request {index} (utility 0) got noise from its batch"
        else:
            scaled[level].append((logits - bare) / level)
    for level, noise in scaled.items():  # (z' - z) / utility ~ N(0, 1) per level: each row got its own utility
        std = np.concatenate(noise).std()
        assert 0.7 < std < 1.3, f"utility {level}: (z'-z)/utility has std {std:.2f}, expected 1"


def test_a_few_hundred_requests_leave_no_traceback_in_the_server_log(triton, clients, models):
    """Each reply used to print numpy's `ValueError: PyCapsule_GetPointer called with incorrect name` to
    the server log (the 2.51 stub marks a consumed DLPack capsule "used_dlpack", not "used_dltensor").
    320 requests of mixed tiers over gRPC (concurrent) and HTTP, to both models: every reply arrives,
    and the log, from the server's start, holds no traceback and no Python exception."""
    model, llama = models["resnet"], models["llama"]
    rng = np.random.default_rng(1)
    errors, done = [], threading.Semaphore(0)

    def callback(result, error):
        if error is not None:
            errors.append(error)
        done.release()

    for index in range(256):
        focus = np.zeros(model.classes, np.float32)
        focus[index % model.classes] = 2.0 if index % 5 == 0 else 0.0
        inputs = request(model, slice(index % IMAGES, index % IMAGES + 1), [0.0, 0.5, 3.0][index % 3], focus)
        clients["grpc"].async_infer(model.name, _tensors(grpcclient, inputs), callback)
    for index in range(64):
        rows = slice(index % len(llama.bare), index % len(llama.bare) + 1)
        logits = infer("http", clients["http"], llama, request(llama, rows, float(rng.uniform(0, 2) * (index % 2))))
        assert np.all(np.isfinite(logits))
    for _ in range(256):
        assert done.acquire(timeout=60), "a response did not arrive within 60 s"
    assert not errors, errors[:3]
    log = triton.log()
    assert "Traceback" not in log and "Error:" not in log, log[log.find("Traceback") - 200 :][:2000]


MALFORMED = {  # Triton's own checks against the config, or the front's
    "focus of the wrong length": (lambda r: r.update(focus=r["focus"][:, :9]), "focus"),
    "missing utility": (lambda r: r.pop("utility"), "utility"),
    "utility as float64": (lambda r: r.update(utility=r["utility"].astype(np.float64)), "utility"),
    "a batch above max_batch_size": (
        lambda r: r.update({k: np.concatenate([v, v[:1]]) for k, v in r.items()}),
        "batch",
    ),
}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("how", sorted(MALFORMED))
def test_a_malformed_request_gets_a_400_and_the_server_keeps_serving(clients, models, protocol, how):
    model = models["resnet"]
    bad = request(model)
    edit, word = MALFORMED[how]
    edit(bad)
    with pytest.raises(InferenceServerException) as error:
        infer(protocol, clients[protocol], model, bad)
    assert word in str(error.value)
    assert error.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), error.value.status()
    assert np.array_equal(infer(protocol, clients[protocol], model, request(model)), model.bare)


# Knobs and images `aim run` refuses (contract.check_modulation, the build's range): the server refuses
# them too, with the same reason, before the engine runs. (rows, utility, focus edit, image, reason)
NAN, INF = np.float32("nan"), np.float32("inf")
REFUSED = {
    "utility NaN": ([NAN], None, None, "utility must be finite"),
    "utility -2": ([-2.0], None, None, "must lie in [0"),
    "utility +inf": ([INF], None, None, "utility must be finite"),
    "utility -inf": ([-INF], None, None, "utility must be finite"),
    "utility 1e30": ([1e30], None, None, "must lie in [0"),
    "focus NaN": ([0.0], (0, NAN), None, "focus must be finite"),
    "focus +inf": ([0.0], (3, INF), None, "focus must be finite"),
    "focus -inf": ([0.0], (4, -INF), None, "focus must be finite"),
    "image 8x8": ([0.0], None, (8, 8), "outside the range"),
    "image 1024x1024": ([0.0], None, (1024, 1024), "outside the range"),
}


def refused_request(model: Model, how: str) -> dict:
    utility, focus_edit, image, _ = REFUSED[how]
    inputs = request(model, slice(0, 1), utility)
    if focus_edit is not None:
        inputs["focus"][0, focus_edit[0]] = focus_edit[1]
    if image is not None:
        inputs["pixel_values"] = np.zeros((1, 3, *image), np.float32)
    return inputs


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_nan_inf_and_negative_knobs_and_images_out_of_range_get_a_400_with_the_reason(clients, models, protocol):
    """A NaN utility used to be sanitised to 0 in the graph: the bare model, to anyone. Now every such
    request is refused as `aim run` refuses it (the same check), a 400 naming the reason; the server
    serves on. (The graph's own fail-closed rule stays behind it for other clients of the engine.)"""
    model = models["resnet"]
    for how, (*_, reason) in REFUSED.items():
        bad = refused_request(model, how)
        with pytest.raises(InferenceServerException) as error:
            infer(protocol, clients[protocol], model, bad)
        status = error.value.status()
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (how, status, str(error.value))
        assert reason in str(error.value), (how, str(error.value))
    focus = np.zeros((1, model.classes), np.float32)
    np.testing.assert_array_equal(
        infer(protocol, clients[protocol], model, request(model, slice(0, 1), 0.0, focus)), model.bare[:1]
    )


def _aim_serve(repository, *flags) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "aim.cli", "serve", str(repository), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        start_new_session=True,
    )


def test_aim_serve_starts_prints_the_urls_and_stops_on_ctrl_c(triton):
    """And while it runs, a second `aim serve` on its port, or on its repository (whose log it writes),
    ends with one `error:` line saying which port, or which log, and what to do, having started
    nothing and left the running server's log as it was (issue 21: it printed the banner and 11 lines
    of Triton's log, and truncated the running server's log)."""
    process = _aim_serve(triton.repository, "--http-port", "0", "--grpc-port", "0", "--model", "resnet")
    lines, deadline = [], time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("models:"):
                break
        text = "".join(lines)
        assert "HTTP  http://127.0.0.1:" in text and "gRPC  127.0.0.1:" in text and "models: resnet;" in text, text
        url = text.split("HTTP  http://")[1].split()[0]
        assert httpclient.InferenceServerClient(url).is_model_ready("resnet")
        log = triton.repository.with_name(triton.repository.name + ".log")
        written = log.read_bytes()
        assert b"successfully loaded 'resnet'" in written
        port = url.split(":")[1]
        for flags, said in (
            (("--http-port", port, "--grpc-port", "0"), f"HTTP port {port} on 127.0.0.1 is in use"),
            (("--http-port", "0", "--grpc-port", "0"), f"{log} is the log of a Triton server still running"),
        ):
            second = _aim_serve(triton.repository, *flags, "--model", "resnet")
            try:
                out, _ = second.communicate(timeout=60)
            finally:
                _stop(second)
            assert second.returncode == 2 and out.startswith("error: ") and said in out, out
            assert len(out.strip().splitlines()) == 1, out  # one line, no banner, no Triton log
            assert log.read_bytes()[: len(written)] == written  # the running server's log, untouched
        assert httpclient.InferenceServerClient(url).is_model_ready("resnet")  # and that server serves on
        os.killpg(process.pid, signal.SIGINT)
        out, _ = process.communicate(timeout=30)
        assert process.returncode == 0 and "stopped" in out, out
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C, so that `aim serve` stops its server (which runs in a process group of its own), then
    SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_server_that_cannot_load_its_models_says_why_and_leaves_no_process(triton, build_folder, tmp_path):
    """A tensorrt_plan model (KIND_GPU) on this machine: no GPU, no TensorRT backend. The start fails
    with the server's own reason, and no process is left."""
    from aim.serving.server import TritonServer, TritonServerError
    from aim.serving.triton import write_model

    folder = tmp_path / "resnet"
    shutil.copytree(build_folder("resnet"), folder)
    (folder / "engine.plan").write_bytes(b"not a real plan")
    manifest = Manifest.load(folder)
    manifest.engine = "engine.plan"
    manifest.record("engine.plan", folder / "engine.plan")
    manifest.save()
    write_model(folder, tmp_path / "repo")
    server = TritonServer(tmp_path / "repo")
    with pytest.raises(TritonServerError, match="exited with code") as error:
        server.start(timeout=30)
    assert "resnet" in str(error.value) and server.process is None
    with pytest.raises(TritonServerError, match="does not exist"):
        TritonServer(tmp_path / "nothing").start()
    assert triton.ready()  # the session's server is unharmed


@pytest.mark.parametrize("family", ["resnet", "segformer", "llama"])
def test_a_keyed_model_gives_the_same_request_the_same_answer_also_in_a_dynamic_batch(clients, keyed_build, family):
    """Keyed noise through Triton: a request sent again (over HTTP, then gRPC) gets the same answer bit
    for bit, and 16 concurrent requests that the server batches together each get their own row's
    answer, as the engine gives it alone, within FLOAT_BATCH_ATOL (the float math may move a last bit
    with the batch), times SMOOTH_NOISE_SLOPE for rows' smooth noise: far closer than any other row's."""
    from aim.layout import REFERENCE
    from aim.verify.reference import Reference

    manifest = keyed_build(family)
    name, classes = family + "-keyed", manifest.modulation.num_classes
    inputs = Reference.load(manifest.folder / REFERENCE).inputs
    rows = next(iter(inputs.values())).shape[0]

    def one(row, utility=2.0):
        return {
            **{k: v[row : row + 1] for k, v in inputs.items()},
            "utility": np.full((1, 1), utility, np.float32),
            "focus": np.zeros((1, classes), np.float32),
        }

    def send(protocol, request_inputs):
        module = PROTOCOLS[protocol]
        result = clients[protocol].infer(
            name, _tensors(module, request_inputs), outputs=[module.InferRequestedOutput("logits")]
        )
        return result.as_numpy("logits")

    start = _counts(clients["http"], name)  # no other test sends to <family>-keyed
    alone = [send("http", one(row)) for row in range(rows)]
    atol = FLOAT_BATCH_ATOL * (SMOOTH_NOISE_SLOPE if alone[0].ndim == 2 else 1)
    others = np.abs(np.concatenate(alone)[:, None] - np.concatenate(alone)[None]).reshape(rows, rows, -1).max(-1)
    assert others[~np.eye(rows, dtype=bool)].min() > 100 * atol  # the tolerance tells rows apart
    for row in range(rows):
        assert np.array_equal(send("grpc", one(row)), alone[row])
    local = OnnxRuntimeEngine(manifest.engine_path())  # the server runs the build's keyed engine
    np.testing.assert_allclose(
        np.concatenate(alone),
        np.concatenate([local.run({k: v[r : r + 1] for k, v in inputs.items()}, 2.0) for r in range(rows)]),
        rtol=0,
        atol=atol,  # the server's ONNX Runtime threads may sum in another order than this one's
    )
    assert not np.allclose(send("http", one(0, utility=2.5)), alone[0], atol=1e-3)  # another tier, another draw

    _counted(clients["http"], name, start, 2 * rows + 1)  # counted once sent: a late count would join the batch's
    before = _counts(clients["http"], name)
    results, done = {}, threading.Semaphore(0)
    for index in range(16):
        clients["grpc"].async_infer(
            name,
            _tensors(grpcclient, one(index % rows)),
            lambda result, error, i=index: (results.__setitem__(i, (result, error)), done.release()),
        )
    for _ in range(16):
        assert done.acquire(timeout=60), "a response did not arrive within 60 s"
    inferences, executions = _counted(clients["http"], name, before, 16)
    assert inferences == 16 and executions < inferences, f"no dynamic batching: {executions} executions"
    for index, (result, error) in results.items():
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("logits"), alone[index % rows], rtol=0, atol=atol)


def test_the_untiered_text_model_takes_utility_and_refuses_a_bad_one(triton, build_folder):
    """llama-text of an untiered repository: `"utility": 0` gives `aim generate`'s text; a negative
    utility, or none, is a 400 saying why."""
    import json
    import urllib.error
    import urllib.request

    from aim.generation import generate_text

    def post(body):
        request = urllib.request.Request(
            f"http://{triton.http_url}/v2/models/llama-text/generate", data=json.dumps(body).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    expected = generate_text(build_folder("llama"), ["def main():"], max_new_tokens=6)[0][0]
    assert post({"text_input": "def main():", "max_tokens": 6, "utility": 0}) == (
        200,
        {"model_name": "llama-text", "model_version": "1", "text_output": expected},
    )
    status, said = post({"text_input": "def main():", "max_tokens": 6, "utility": -1})
    assert status == 400 and "must lie in [0" in said["error"], said
    status, said = post({"text_input": "def main():", "max_tokens": 6})
    assert status == 400 and "give 'utility'" in said["error"], said
