"""A Python-based Triton backend named `onnxruntime`: runs `onnxruntime_onnx` models with ONNX Runtime.

Triton maps `platform: "onnxruntime_onnx"` to the backend `onnxruntime`; when the backend directory has
no libtriton_onnxruntime.so but has `onnxruntime/model.py`, Triton runs this file with its Python
backend. So a server without the C++ ONNX Runtime backend (the one in `nvidia-pytriton`) loads a
model repository written for the real backend, unchanged. It does what that backend does with a
config: reads `default_model_filename` from the version folder, applies each tensor's `reshape`,
and runs the requests of a dynamic batch as one batch (concatenated on the batch dim, split again).

Runs inside Triton's Python backend stub: only numpy, onnxruntime and triton_python_backend_utils.
Tensors cross the stub by DLPack, never by `as_numpy()` / `Tensor(name, ndarray)`: the stub of
Triton 2.51 reads numpy 1.x's array structs, so with numpy 2 those give zero-filled inputs and empty
outputs without an error; DLPack carries shape, dtype and data pointer itself.

The stub marks a DLPack capsule it has consumed "used_dlpack" where the DLPack protocol says
"used_dltensor" (python_backend src/pb_tensor.cc, FromDLPackCapsule). numpy's capsule destructor then
takes the capsule for unconsumed, fails to read it and prints a traceback to the server log: one per
output tensor, so one or more per request. `_output_tensor` renames the capsule to the protocol's
name after the stub took it. Ownership is as before: the stub's tensor calls numpy's deleter.
"""

import ctypes
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

THREADS_PARAMETER = "intra_op_thread_count"  # the same parameter name as Triton's C++ backend


def _reshape(entry):
    reshape = entry.get("reshape")
    return None if reshape is None else [int(d) for d in reshape.get("shape", [])]


# PyCapsule_SetName keeps the pointer, not a copy: these bytes live as long as the module.
_STUB_CONSUMED = b"used_dlpack"
_CONSUMED = b"used_dltensor"
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _output_tensor(name, array):
    """pb_utils.Tensor of a numpy array, by DLPack, with the capsule marked consumed as DLPack says."""
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    if _capsule_is_valid(capsule, _STUB_CONSUMED):
        _capsule_set_name(capsule, _CONSUMED)
    return tensor


class _StubTensor:
    """A stub tensor as numpy.from_dlpack wants it. numpy first calls `__dlpack__(max_version=...)`,
    which the 2.51 stub's tensors refuse with a TypeError (they take `stream` only), and then calls
    again without: an exception per input. This hands numpy the stub's capsule on the first call."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, **_):
        return self.tensor.to_dlpack()

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


def _parameter(config, key):
    value = (config.get("parameters") or {}).get(key)
    return None if value is None else value.get("string_value")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = ort.SessionOptions()
        threads = _parameter(config, THREADS_PARAMETER)
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [(entry["name"], _reshape(entry)) for entry in config["input"]]
        self.outputs = [(entry["name"], _reshape(entry), [int(d) for d in entry["dims"]]) for entry in config["output"]]
        known = {i.name for i in self.session.get_inputs()}
        missing = [name for name, _ in self.inputs if name not in known]
        if missing:
            raise pb_utils.TritonModelException(f"{path} has no inputs {missing}; its inputs are {sorted(known)}")

    def _feed(self, request):
        """The request's inputs as the model sees them: [b, *reshape] instead of [b, *dims]."""
        # One inputs() call: pb_utils.get_input_tensor_by_name calls it (and wraps every tensor) per name.
        tensors = {tensor.name(): tensor for tensor in request.inputs()}
        feed = {}
        for name, reshape in self.inputs:
            tensor = tensors.get(name)
            if tensor is None:
                raise ValueError(f"input {name!r} is missing")
            array = np.from_dlpack(_StubTensor(tensor))
            if reshape is not None:
                lead = [array.shape[0]] if self.batching else []
                array = array.reshape(lead + reshape)
            feed[name] = array
        return feed

    def _size(self, feed):
        return next(iter(feed.values())).shape[0] if self.batching else 1

    def _run(self, feed):
        names = [name for name, _, _ in self.outputs]
        return dict(zip(names, self.session.run(names, feed)))

    def _responses(self, results, sizes):
        """Splits batched outputs back into one response per request, in the config's dims."""
        responses, start = [], 0
        for size in sizes:
            tensors = []
            for name, reshape, dims in self.outputs:
                part = results[name][start : start + size] if self.batching else results[name]
                if reshape is not None:
                    part = part.reshape(([size] if self.batching else []) + dims)
                tensors.append(_output_tensor(name, part))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def execute(self, requests):
        responses = [None] * len(requests)
        feeds = {}
        for index, request in enumerate(requests):
            try:
                feeds[index] = self._feed(request)
            except Exception as error:  # noqa: BLE001 - reported to that client, the others go on
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        # Requests whose non-batch shapes agree run as one batch, like Triton's C++ backends do.
        groups = {}
        for index, feed in feeds.items():
            key = tuple((name, array.shape[1:] if self.batching else array.shape) for name, array in feed.items())
            groups.setdefault(key, []).append(index)
        for members in groups.values():
            try:
                if self.batching and len(members) > 1:
                    batch = {name: np.concatenate([feeds[i][name] for i in members]) for name, _ in self.inputs}
                else:
                    batch = feeds[members[0]]
                sizes = [self._size(feeds[i]) for i in members]
                for index, response in zip(members, self._responses(self._run(batch), sizes)):
                    responses[index] = response
            except Exception:  # noqa: BLE001 - one bad request must not fail the batch: run alone
                for index in members:
                    try:
                        responses[index] = self._responses(self._run(feeds[index]), [self._size(feeds[index])])[0]
                    except Exception as error:  # noqa: BLE001
                        responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        return responses

    def finalize(self):
        self.session = None
