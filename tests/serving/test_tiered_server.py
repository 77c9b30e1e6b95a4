"""A tiered repository on the real Triton server: the tier comes from the request's key, never from
what else it carries.

Tiers: free (the default, sigma 3), pro (sigma 1), premium (sigma 0), keys made by `aim tiers key`.
The noise a request got is measured against the bare logits (ONNX Runtime on the build's bare graph):
(z' - z) / sigma over a request's 32 x 10 logits is N(0, 1) per element, so its sum of squares is
chi-square with 320 degrees of freedom. A tier is accepted when that sum lies inside the central
1 - 1e-9 of the distribution: a correct server fails one check in 10^9 (about 20 checks here: 2e-8 for
the module). Power: the interval is about 320 +- 150, so a sigma off by a factor of 1.3 either way
(or the premium tier's 0, or pro's 1 for free's 3) falls outside it with certainty.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from scipy.stats import chi2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from aim.contract import UTILITY, UTILITY_LEVEL
from aim.layout import Manifest
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from tests.serving.conftest import skip_without_server

SIGMAS = {"free": 3.0, "pro": 1.0, "premium": 0.0}
FALSE_ALARM = 1e-9  # per check
PROTOCOLS = {"http": httpclient, "grpc": grpcclient}
PROMPTS = ["def main():", "The quick brown fox", "import numpy as np\n"]
MAX_TOKENS = 12


class Tiered:
    def __init__(self, server, repository, tiers, keys, log):
        self.server, self.repository, self.tiers, self.keys, self.log = server, repository, tiers, keys, log
        self.http = httpclient.InferenceServerClient(server.http_url)
        self.grpc = grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture(scope="module")
def tiered(build_folder, tmp_path_factory):
    """The server on a tiered repository: resnet, llama and llama-text, one instance each."""
    from aim.serving.server import TritonServer
    from aim.serving.tiers import add_key
    from aim.serving.triton import write_model

    skip_without_server()
    root = tmp_path_factory.mktemp("tiered")
    tiers = root / "tiers.json"
    tiers.write_text(
        json.dumps({"default": "free", "tiers": {name: {"utility": s} for name, s in SIGMAS.items()}, "keys": {}})
    )
    keys = {tier: add_key(tiers, tier) for tier in ("premium", "pro")}
    repository = root / "repository"
    write_model(build_folder("resnet"), repository, tiers=tiers, instances=1)
    write_model(build_folder("llama"), repository, tiers=tiers, instances=1)
    write_model(build_folder("llama"), repository, tiers=tiers, instances=1, text=True)
    log = root / "tritonserver.log"
    server = TritonServer(repository, log_path=log).start()
    try:
        found = Tiered(server, repository, tiers, keys, log)
        yield found
        found.http.close()
        found.grpc.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def images(build_folder):
    rng = np.random.default_rng(3)
    pixels = rng.normal(size=(32, 3, 32, 32)).astype(np.float32)
    bare = OnnxRuntimeEngine(Manifest.load(build_folder("resnet")).graph_path("bare")).infer({"pixel_values": pixels})
    return pixels, bare["logits"]


def _tensors(module, inputs: dict):
    tensors = []
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        tensors.append(tensor)
    return tensors


def infer(tiered, protocol, inputs, headers=None, parameters=None, model="resnet"):
    module = PROTOCOLS[protocol]
    client = getattr(tiered, protocol)
    result = client.infer(
        model,
        _tensors(module, inputs),
        outputs=[module.InferRequestedOutput("logits")],
        headers=headers,
        parameters=parameters,
    )
    return result.as_numpy("logits")


def noise_matches(logits, bare, sigma) -> bool:
    """The chi-square check of the module docstring: the noise has the tier's sigma."""
    total = float(np.sum(((logits.astype(np.float64) - bare) / sigma) ** 2))
    return chi2.ppf(FALSE_ALARM / 2, bare.size) <= total <= chi2.isf(FALSE_ALARM / 2, bare.size)


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_no_served_model_of_the_tiered_repository_takes_a_utility(tiered):
    """Were one to take it, any client would call that one with utility 0 (the premium answer)."""
    assert tiered.server.models_ready() == ["llama", "llama-text", "resnet"]
    for name in tiered.server.models_ready():
        inputs = [entry["name"] for entry in tiered.http.get_model_config(name).get("input", [])]
        assert not {UTILITY, UTILITY_LEVEL} & set(inputs), (name, inputs)
        assert not {UTILITY, UTILITY_LEVEL} & {i.name for i in tiered.grpc.get_model_metadata(name).inputs}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_the_premium_key_gets_the_bare_model_bit_for_bit(tiered, images, protocol):
    pixels, bare = images
    premium = {"authorization": bearer(tiered.keys["premium"])}  # gRPC metadata keys are lower case
    np.testing.assert_array_equal(infer(tiered, protocol, {"pixel_values": pixels}, premium), bare)
    focus = np.zeros((32, 10), np.float32)
    focus[:, 4] = 5.0  # the user's knob at the premium tier: class 4 moves up, nothing else moves
    focused = infer(tiered, protocol, {"pixel_values": pixels, "focus": focus}, premium)
    assert np.array_equal(np.delete(focused, 4, axis=1), np.delete(bare, 4, axis=1))
    assert np.all(focused[:, 4] >= bare[:, 4]) and np.any(focused[:, 4] > bare[:, 4])
    pro = infer(tiered, protocol, {"pixel_values": pixels}, {"authorization": bearer(tiered.keys["pro"])})
    assert noise_matches(pro, bare, SIGMAS["pro"])


def _invented(keys) -> dict[str, dict]:
    from aim.serving.tiers import key_digest

    premium = keys["premium"]
    return {
        "no key": {},
        "a wrong key": {"authorization": bearer("aim_" + "x" * 43)},
        "the key without Bearer": {"authorization": premium},
        "a tier's name as the key": {"authorization": bearer("premium")},
        "the stored digest as the key": {"authorization": bearer(key_digest(premium))},
        "X-Tier: premium": {"x-tier": "premium"},
        "Tier: premium": {"tier": "premium"},
        "the key in X-Api-Key": {"x-api-key": premium},
        "the key in X-Authorization": {"x-authorization": bearer(premium)},
        "utility: 0 as a header": {"utility": "0"},
    }


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_without_the_premium_key_every_request_gets_the_default_tiers_noise(tiered, images, protocol):
    """No key, a wrong key and headers a client can invent: the default tier (free, sigma 3), by the
    noise's spread (module docstring), never premium's 0 or pro's 1."""
    pixels, bare = images
    for how, headers in _invented(tiered.keys).items():
        logits = infer(tiered, protocol, {"pixel_values": pixels}, headers)
        assert noise_matches(logits, bare, SIGMAS["free"]), how


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_a_smuggled_utility_or_tier_is_refused(tiered, images, protocol):
    """A `utility` tensor (Triton: not an input of the model), and request parameters naming a knob or
    a tier: each refused with a 400, nothing runs. A key both as header and as request parameter: the
    server sets the header's after the request's own parameters, so under one name the header's key
    counts; an HTTP header spelt `Authorization` arrives beside a parameter `authorization` and the
    two, differing, are refused."""
    pixels, bare = images
    smuggled = {"pixel_values": pixels, "utility": np.zeros((32, 1), np.float32)}
    two_keys = ({"authorization": bearer(tiered.keys["pro"])}, {"authorization": bearer(tiered.keys["premium"])})
    attempts = [
        (smuggled, None, None, "unexpected inference input 'utility'"),
        ({"pixel_values": pixels}, None, {"utility": 0.0}, "request parameter 'utility' is not taken"),
        ({"pixel_values": pixels}, None, {"tier": "premium"}, "request parameter 'tier' is not taken"),
    ]
    assert noise_matches(infer(tiered, protocol, {"pixel_values": pixels}, *two_keys), bare, SIGMAS["pro"])
    if protocol == "http":
        spelt = {"Authorization": two_keys[0]["authorization"]}
        attempts.append(({"pixel_values": pixels}, spelt, two_keys[1], "more than one Authorization value"))
    for inputs, headers, parameters, said in attempts:
        with pytest.raises(InferenceServerException) as error:
            infer(tiered, protocol, inputs, headers, parameters)
        assert error.value.status() in ("400", "StatusCode.INVALID_ARGUMENT") and said in str(error.value), str(
            error.value
        )


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_nan_or_infinite_focus_and_images_out_of_range_get_a_400_on_the_tiered_model(tiered, images, protocol):
    pixels, _ = images
    premium = {"authorization": bearer(tiered.keys["premium"])}
    for how, inputs, said in (
        ("focus NaN", {"pixel_values": pixels[:1], "focus": np.full((1, 10), np.nan, np.float32)}, "finite"),
        ("focus inf", {"pixel_values": pixels[:1], "focus": np.full((1, 10), np.inf, np.float32)}, "finite"),
        ("image 8x8", {"pixel_values": np.zeros((1, 3, 8, 8), np.float32)}, "outside the range"),
        ("image 1024", {"pixel_values": np.zeros((1, 3, 1024, 1024), np.float32)}, "outside the range"),
    ):
        with pytest.raises(InferenceServerException) as error:
            infer(tiered, protocol, inputs, premium)
        assert error.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), (how, error.value.status())
        assert said in str(error.value), (how, str(error.value))


def post(tiered, endpoint: str, body: dict, headers=None) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{tiered.server.http_url}/v2/models/llama-text/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def generated(tiered, prompt: str, key: str | None = None, **fields) -> str:
    body = {"text_input": prompt, "max_tokens": MAX_TOKENS, **fields}
    if key:
        body["authorization"] = bearer(key)  # Triton forwards no header on /generate: the key goes in the body
    status, text = post(tiered, "generate", body)
    assert status == 200, text
    return json.loads(text)["text_output"]


def streamed(tiered, prompt: str, key: str) -> list[str]:
    body = {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True, "authorization": bearer(key)}
    status, text = post(tiered, "generate_stream", body)
    assert status == 200, text
    events = [json.loads(chunk[len("data: ") :]) for chunk in text.split("\n\n") if chunk.startswith("data: ")]
    assert all("error" not in event for event in events), events
    return [event["text_output"] for event in events]


def test_generate_at_the_premium_tier_is_aim_generate_and_the_stream_streams_the_same_text(tiered, build_folder):
    """Greedy decoding at utility 0: the server's text is `aim generate`'s on the same build, token for
    token (the same loop, aim.generation, run in the server); /generate_stream sends it in pieces."""
    from aim.generation import generate_text

    premium = tiered.keys["premium"]
    for prompt in PROMPTS:
        expected = generate_text(build_folder("llama"), [prompt], max_new_tokens=MAX_TOKENS)[0][0]
        assert generated(tiered, prompt, premium) == expected
        pieces = streamed(tiered, prompt, premium)
        assert len(pieces) >= 3 and "".join(pieces) == expected, pieces
    # without the key: the default tier, sigma 3 on logits whose gaps are far smaller: another text
    assert generated(tiered, PROMPTS[0]) != generated(tiered, PROMPTS[0], premium)


def test_concurrent_streams_do_not_mix(tiered):
    """Six streams at once (two per prompt), each decoded in its own thread on the one engine: each
    gets its own prompt's text, as it gets it alone."""
    premium = tiered.keys["premium"]
    alone = {prompt: generated(tiered, prompt, premium) for prompt in PROMPTS}
    results, errors = {}, []

    def run(index, prompt):
        try:
            results[index] = "".join(streamed(tiered, prompt, premium))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    assert {i: results[i] for i in range(len(threads))} == {i: alone[p] for i, p in enumerate(PROMPTS * 2)}


def test_the_limits_of_aim_generate_hold_and_a_bad_field_is_a_400(tiered):
    premium = tiered.keys["premium"]
    long_prompt = "word " * 2000
    for body, said in (
        ({"text_input": "hi", "max_tokens": 100000}, "positions, more than the"),
        ({"text_input": long_prompt, "max_tokens": 4}, "tokens, more than the"),
        ({"text_input": "hi", "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": 4}, "give the prompt as 'text_input'"),
        ({"text_input": "hi", "utility": 0}, "the utility comes from the key"),
        ({"text_input": "hi", "temperature": -1}, "temperature must be >= 0"),
        ({"text_input": "hi", "focus": "+=3"}, "focus items are"),
        ({"text_input": "hi", "top_k": 3}, "'top_k' is not a field"),
        ({"text_input": "hi", "max_tokens": "many"}, "'max_tokens' must be int"),
    ):
        for endpoint in ("generate", "generate_stream"):
            status, text = post(tiered, endpoint, {**body, "authorization": bearer(premium)})
            assert status == 400 and said in text, (body, endpoint, status, text)
    assert generated(tiered, "hi", premium, max_tokens=2)  # the model serves on


def test_keys_are_nowhere_in_clear(tiered, images):
    """After requests carrying the keys (headers, request parameters, generate bodies): neither key is
    in any file of the model repository, in the server's log, or in the owner's tiers file, which
    holds their SHA-256."""
    from aim.serving.tiers import key_digest

    pixels, _ = images
    for key in tiered.keys.values():
        infer(tiered, "http", {"pixel_values": pixels[:1]}, {"Authorization": bearer(key)})
        infer(tiered, "grpc", {"pixel_values": pixels[:1]}, {"authorization": bearer(key)})
        infer(tiered, "http", {"pixel_values": pixels[:1]}, None, {"authorization": bearer(key)})
        generated(tiered, "hi", key, max_tokens=2)
        post(tiered, "generate", {"text_input": "hi", "max_tokens": -1, "authorization": bearer(key)})  # refused
    files = [path for path in tiered.repository.rglob("*") if path.is_file()] + [tiered.log, tiered.tiers]
    assert len(files) > 10 and tiered.log.stat().st_size > 0
    for key in tiered.keys.values():
        assert len(key) >= 32
        holding = [str(path) for path in files if key.encode() in path.read_bytes()]
        assert holding == [], holding
        assert key_digest(key) in tiered.tiers.read_text()
