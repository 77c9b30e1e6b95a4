"""Which backend builds and runs an engine here, and why."""

from __future__ import annotations

from aim.errors import AimError

# "auto" picks TensorRT where a CUDA GPU and the tensorrt module are present, else ONNX Runtime.
BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx")
TENSORRT_BACKENDS = ("tensorrt", "tensorrt-rtx")


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """The backend to use and one line saying why; a backend that cannot work here fails, saying
    what to install."""
    from aim.runtime import tensorrt as trt_engine

    if requested not in BACKENDS:
        raise AimError(f"unknown backend {requested!r}; available: {', '.join(BACKENDS)}")
    if requested == "onnxruntime":
        return requested, "onnxruntime: asked for"
    if requested == "tensorrt-rtx":
        trt_engine.import_api(requested)  # fails with what to install
        runnable, why = trt_engine.engine_runnable(requested)
        return requested, "tensorrt-rtx: asked for; builds here" + (
            "" if runnable else f", but cannot run here ({why})"
        )
    if requested == "tensorrt":
        trt_engine.import_api(requested)
        gpu, why = trt_engine.cuda_gpu_available()
        if not gpu:
            raise trt_engine.BackendUnavailableError(
                f"backend tensorrt builds and runs on an NVIDIA GPU, and this machine has none ({why}). "
                f"Use BACKEND=tensorrt-rtx to build a TensorRT for RTX engine here, or BACKEND=onnxruntime."
            )
        return requested, f"tensorrt: asked for ({why})"
    gpu, why = trt_engine.cuda_gpu_available()
    if not gpu:
        return "onnxruntime", f"onnxruntime: auto, no CUDA GPU for TensorRT ({why})"
    try:
        trt_engine.import_api("tensorrt")
    except trt_engine.BackendUnavailableError:
        return (
            "onnxruntime",
            f"onnxruntime: auto, {why} but the tensorrt module is not installed (pip install -e '.[gpu]')",
        )
    return "tensorrt", f"tensorrt: auto, {why} and tensorrt installed"


def runnable_here(backend: str) -> tuple[bool, str]:
    """Whether engines of `backend` run on this machine, and why not."""
    if backend == "onnxruntime":
        return True, ""
    from aim.runtime.tensorrt import engine_runnable

    return engine_runnable(backend)
