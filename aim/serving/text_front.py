"""`<name>-text`: text in, text out, for a text-generation build (Triton's generate extension).

    POST /v2/models/<name>-text/generate
         {"text_input": "...", "max_tokens": 32, "focus": "+word=5,-other=10", "temperature": 0}
      -> {"text_output": "...", "model_name": ..., "model_version": ...}
    POST /v2/models/<name>-text/generate_stream   (the same body with "stream": true)
      -> server-sent events, one per decoded piece (a token, or a few where a character spans several)

A decoupled Python-backend model: the tokenizer, the KV cache and the decode loop (aim's own,
generation.text.texts_of, the loop `aim generate` runs) run in the server on the build's engine.
Each request decodes in its own thread (its own cache and sampler): concurrent streams share the
engine and nothing else. Generate fields that are not model inputs reach a model as request
parameters, which is how this model reads all of them (it has no input tensors). Without
`"stream": true` the model sends one response, which is what /generate requires; with it, one per
piece, for /generate_stream.

The tier comes from the key, as for the tensor models (front.py); an untiered build's text model
takes `"utility"` instead. `aim generate`'s limits hold (prompt length, prompt + new tokens within
the build's positions), checked by the same code before anything runs; a refusal is a 400.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aim.errors import AimError, InvalidInputError
from aim.serving.front import TIERS, FrontSpec, authorization, model_parameter, open_engine

TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"
DEFAULT_MAX_TOKENS = 32  # as `aim generate`
WORKERS_PARAMETER = "streams_per_instance"  # concurrent decode loops per instance
FIELDS = {  # generate field -> (types it may have, what it is)
    TEXT_INPUT: ((str,), "the prompt"),
    "max_tokens": ((int,), f"new tokens at most (default {DEFAULT_MAX_TOKENS})"),
    "focus": ((str,), 'tokens to boost or suppress, "+word=5,-other=10,+#123=4"'),
    "temperature": ((int, float), "0 = greedy (default)"),
    "stream": ((bool,), "true: one event per piece (for /generate_stream)"),
}
UTILITY_FIELD = ((int, float), "noise scale sigma >= 0 (untiered builds; a tiered one takes it from the key)")


class Cancelled(Exception):
    pass


class TextFront:
    """One text model's request handling, apart from Triton's API."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        from aim.generation.text_tokenizer import TextTokenizer
        from aim.serving.tiers import TierTable

        folder = Path(folder)
        self.spec = FrontSpec.load(folder)
        self.engine = open_engine(folder, self.spec, threads)
        self.tokenizer = TextTokenizer(folder / self.spec.extra["tokenizer"])
        self.tiers = TierTable.load(folder / TIERS) if self.spec.tiered else None
        self.fields = dict(FIELDS) if self.tiers is not None else {**FIELDS, "utility": UTILITY_FIELD}

    def request(self, parameters: dict) -> dict:
        """The generate fields of a request, checked: {"prompt", "utility", "focus", ...}."""
        fields = {name: value for name, value in parameters.items() if name.lower() != "authorization"}
        for name, value in fields.items():
            if name not in self.fields:
                said = "the utility comes from the key in the Authorization header" if name == "utility" else ""
                raise InvalidInputError(
                    f"{name!r} is not a field of this model{': ' + said if said else ''}; its fields: "
                    + ", ".join(f"{field} ({what})" for field, (_, what) in self.fields.items())
                )
            types, what = self.fields[name]
            if type(value) not in types:  # bool is not a number here, nor a number a bool
                raise InvalidInputError(f"{name!r} must be {' or '.join(t.__name__ for t in types)} ({what})")
        if TEXT_INPUT not in fields:
            raise InvalidInputError(f"give the prompt as {TEXT_INPUT!r}")
        if self.tiers is not None:
            utility = self.tiers.sigma(self.tiers.tier_of(authorization(parameters)))
        elif "utility" not in fields:
            raise InvalidInputError("give 'utility' (sigma >= 0, 0 = the original model)")
        else:
            utility = float(fields["utility"])
        max_tokens = fields.get("max_tokens", DEFAULT_MAX_TOKENS)
        if max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be at least 1, got {max_tokens}")
        return {
            "prompt": fields[TEXT_INPUT],
            "utility": utility,
            "focus": fields.get("focus") or None,
            "max_new_tokens": max_tokens,
            "temperature": float(fields.get("temperature", 0.0)),
            "stream": bool(fields.get("stream", False)),
        }

    def generate(self, fields: dict, send, cancelled=lambda: False) -> str:
        """Decodes one request; `send(piece)` gets each piece when streaming. Returns the text."""
        from aim.generation.text import texts_of

        sent = []

        def piece(text: str):
            if cancelled():
                raise Cancelled
            if fields["stream"] and text:
                send(text)
                sent.append(text)

        texts, _ = texts_of(
            self.engine,
            self.tokenizer,
            [fields["prompt"]],
            max_positions=self.spec.extra.get("max_positions"),
            utility=fields["utility"],
            focus=fields["focus"],
            max_new_tokens=fields["max_new_tokens"],
            temperature=fields["temperature"],
            stream=piece,
        )
        rest = texts[0][len("".join(sent)) :]  # a character still incomplete when the loop ended
        if not fields["stream"] or rest or not sent:
            send(texts[0] if not fields["stream"] else rest)
        return texts[0]


class TritonPythonModel:
    def initialize(self, args):
        from aim.serving.stub import install_text_outputs

        install_text_outputs()
        config = json.loads(args["model_config"])
        threads = model_parameter(config, "intra_op_thread_count")
        workers = int(model_parameter(config, WORKERS_PARAMETER) or 4)
        folder = Path(args["model_repository"]) / args["model_version"]
        self.front = TextFront(folder, int(threads) if threads else None)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aim-text")
        self.lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._serve, request)
        return None  # decoupled: the responses go out through each request's sender

    def _serve(self, request):
        from aim.serving.stub import error_response, parameters, pb, text_tensor

        utils = pb()
        sender = request.get_response_sender()
        final = utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            try:
                fields = self.front.request(parameters(request))

                def send(text: str):
                    sender.send(utils.InferenceResponse(output_tensors=[text_tensor(TEXT_OUTPUT, text)]))

                # the sender's flag, not the request's: in decoupled mode the request may be released first
                self.front.generate(fields, send, sender.is_cancelled)
                sender.send(flags=final)
            except Cancelled:
                sender.send(flags=final)
            except Exception as error:  # noqa: BLE001 - told to this client; the model serves on
                if not isinstance(error, AimError):
                    error = RuntimeError(f"generation failed: {error}")
                sender.send(error_response(error), flags=final)
        except Exception as error:  # noqa: BLE001 - a send failed: the pool would drop it unseen, so it is logged
            utils.Logger.log_error(f"{TEXT_OUTPUT}: a stream ended without its final response: {error!r}")

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.front.engine.close()
