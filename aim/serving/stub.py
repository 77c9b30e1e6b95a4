"""Tensors, parameters and errors across Triton's Python backend stub, for the front models.

Imported only inside the stub (triton_python_backend_utils exists nowhere else), by front.py and
text_front.py. What the stub of Triton 2.51 (the one in nvidia-pytriton) needs under numpy 2:

- Tensors cross by DLPack, never by `as_numpy()` / `Tensor(name, ndarray)`: that stub's pybind11
  reads numpy 1.x's dtype struct, whose `elsize` lies where numpy 2 keeps `flags`, so numpy-made
  arrays come out zero-filled or empty without an error. DLPack carries shape, dtype and pointer.
- The stub marks a DLPack capsule it has consumed "used_dlpack" where the protocol says
  "used_dltensor" (python_backend src/pb_tensor.cc); numpy's capsule destructor then prints a
  traceback per output. `output_tensor` renames the capsule once the stub took it.
- Text (BYTES) outputs: the stub serialises them with `serialize_byte_tensor` and takes the byte
  size from pybind11, which reads the wrong field (0 for bytes). `text_tensor` hands it the
  serialised bytes as an array of a 144-byte aligned struct dtype, whose `flags` happen to read as
  144 = its true item size, padded to a whole number of such items: the length-prefixed element is
  intact and Triton's JSON writer ignores what follows it. The server sets AIM_STUB_NUMPY1_ABI for
  this stub only; a Triton built for the numpy it runs gets the plain tensor.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct

import numpy as np

from aim.errors import AimError

STUB_NUMPY1_ABI = "AIM_STUB_NUMPY1_ABI"  # set by aim.serving.server for nvidia-pytriton's 2.51 stub
# PyCapsule_SetName keeps the pointer, not a copy: these bytes live as long as the module.
_STUB_CONSUMED = b"used_dlpack"
_CONSUMED = b"used_dltensor"
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
# numpy 2 keeps a dtype's flags where numpy 1 kept its elsize; an aligned struct's flags are 144.
_BYTES_ITEM = np.dtype([("bytes", "u1", (144,))], align=True)


def pb():
    import triton_python_backend_utils

    return triton_python_backend_utils


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


def input_arrays(request) -> dict[str, np.ndarray]:
    """A request's input tensors as numpy arrays (one `inputs()` call: the stub wraps every tensor
    again on each)."""
    return {tensor.name(): np.from_dlpack(_StubTensor(tensor)) for tensor in request.inputs()}


def output_tensor(name: str, array: np.ndarray):
    """pb_utils.Tensor of a numpy array, by DLPack, with the capsule marked consumed as DLPack says."""
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb().Tensor.from_dlpack(name, capsule)
    if _capsule_is_valid(capsule, _STUB_CONSUMED):
        _capsule_set_name(capsule, _CONSUMED)
    return tensor


def _serialized(array: np.ndarray):
    data = b"".join(
        struct.pack("<I", len(item)) + item
        for item in (value if isinstance(value, bytes) else str(value).encode() for value in array.ravel().tolist())
    )
    return np.frombuffer(data + b"\0" * (-len(data) % _BYTES_ITEM.itemsize), dtype=_BYTES_ITEM)


def install_text_outputs() -> None:
    """On the 2.51 stub under numpy 2 (module docstring), text outputs go through `_serialized`."""
    if os.environ.get(STUB_NUMPY1_ABI) and int(np.__version__.split(".")[0]) >= 2:
        pb().serialize_byte_tensor = _serialized


def text_tensor(name: str, text: str):
    return pb().Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def parameters(request) -> dict:
    """A request's parameters (its own and the headers Triton forwards) as a dict."""
    found = json.loads(request.parameters() or "{}")
    return found if isinstance(found, dict) else {}


def error_response(error: BaseException):
    """The reply to a request that failed: the request's fault (a bad knob, shape, field: an AimError)
    is Triton's INVALID_ARG, a 400 over HTTP; anything else is the server's, a 500."""
    utils = pb()
    code = utils.TritonError.INVALID_ARG if isinstance(error, AimError) else utils.TritonError.INTERNAL
    return utils.InferenceResponse(error=utils.TritonError(str(error), code))
