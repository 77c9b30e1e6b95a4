"""The Triton server tests' set-up (the build folders they use come from tests/conftest.py's build_folder)."""

from __future__ import annotations

import pytest

TRITON_MODELS = ("resnet", "llama")
KEYED = "-keyed"  # keyed builds (make engine NOISE=keyed) of every family are served beside them as <model>-keyed
INSTANCES = 2  # per model, stated: the default follows the machine's cores


def _server_can_run() -> str | None:
    """Why the pytriton server binary cannot run on this machine, or None. It runs on x86_64 Linux with
    glibc >= 2.35 (the wheel's manylinux_2_35 tag); anywhere else the wheel does not install."""
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        here = f"{platform.system()} {platform.machine()}"
        return f"tritonserver from nvidia-pytriton runs on x86_64 Linux only, this is {here}"
    libc, version = platform.libc_ver()
    if libc == "glibc" and tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
        return f"tritonserver from nvidia-pytriton needs glibc >= 2.35, this machine has {version}"
    return None


def skip_without_server() -> None:
    reason = _server_can_run()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def triton(build_folder, keyed_build, tmp_path_factory):
    """The real Triton server (nvidia-pytriton's 2.51) on an untiered repository: resnet, llama and
    resnet's bare model (resnet-bare), INSTANCES instances each; llama's text model (llama-text) and
    the keyed builds of every family, one instance each."""
    from aim.families import list_families
    from aim.serving.server import TritonServer
    from aim.serving.triton import write_model

    skip_without_server()
    repo = tmp_path_factory.mktemp("triton") / "repository"
    for model in TRITON_MODELS:
        write_model(build_folder(model), repo, instances=INSTANCES)
    write_model(build_folder(TRITON_MODELS[0]), repo, instances=INSTANCES, bare=True)
    write_model(build_folder("llama"), repo, instances=1, text=True)
    for model in list_families():
        write_model(keyed_build(model).folder, repo, name=model + KEYED, instances=1)
    log = repo.with_name("tritonserver.log")
    server = TritonServer(repo, log_path=log).start()  # raises with the server's log if it cannot start
    try:
        yield server
    finally:
        server.stop()
