"""Runs the real Triton Inference Server (2.51, the binary inside `nvidia-pytriton`) on a model repository.

`nvidia-pytriton` ships tritonserver with the Python backend, which runs every entry `aim triton`
writes (front.py). A backend directory made for each server holds the Python backend's files (its
library, its utils and the stub for this Python version).

The `Authorization` header, and no other, is forwarded to the models as a request parameter
(Triton's --http-header-forward-pattern and --grpc-header-forward-pattern): a tiered model reads
the key there. The stubs get AIM_STUB_NUMPY1_ABI: this stub was built for numpy 1 (stub.py).

The server needs, on these machines: the Python installation's lib folder and pytriton's libs on
LD_LIBRARY_PATH (else model loading fails in the stub), and this interpreter's bin folder first on
PATH (else the stub picks another Python's numpy and onnxruntime).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from aim.errors import AimError

START_TIMEOUT_S = 60.0
FORWARDED_HEADERS = "^authorization$"  # Triton matches HTTP header names case-insensitively
STOP_TIMEOUT_S = 10.0


class TritonServerError(AimError):
    pass


def pytriton_dist() -> tuple[Path, Path]:
    """(tritonserver folder, shared libs folder) of the installed nvidia-pytriton wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "nvidia-pytriton is not installed: it ships the Triton server binary. "
            "Install it with `pip install --no-deps nvidia-pytriton==0.7.0` (what `make` does)"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    server = package / "tritonserver"
    if not (server / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"{server}/bin/tritonserver is missing: reinstall nvidia-pytriton")
    return server, package.parent / "nvidia_pytriton.libs"


def make_backend_dir(target: Path) -> Path:
    """<target>/python: Triton's Python backend and the stub for this interpreter. Copies, not links:
    the Python backend looks for its stub beside its own library's real path."""
    server, _ = pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    python = target / "python"
    shutil.copytree(server / "backends" / "python", python, dirs_exist_ok=True)
    shutil.copy2(stub, python / stub.name)
    return target


def server_env() -> dict[str, str]:
    _, libs = pytriton_dist()
    env = dict(os.environ)
    first = [sysconfig.get_config_var("LIBDIR"), str(libs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in first if p] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    from aim.serving.stub import STUB_NUMPY1_ABI

    env[STUB_NUMPY1_ABI] = "1"
    return env


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (a port left in TIME_WAIT counts as free, as
    servers reuse it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _own_log(path: Path, truncate: bool = True):
    """`path` opened for this server's log and locked (flock, shared with the server process, which
    inherits the open file). A log locked by a server still running is refused, never truncated."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "ab")
    try:
        fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.close()
        raise TritonServerError(
            f"{path} is the log of a Triton server still running: stop that server first (or serve another "
            "repository, whose log is its own)"
        ) from None
    if truncate:
        log.truncate(0)
    return log


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, distinct (all held open until each is known)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class TritonServer:
    """One tritonserver process on 127.0.0.1 with every model of `repository` loaded. A port given
    (not 0) must be free; `log_path`, if given, must not be the log of a server still running."""

    repository: Path | list[Path]  # one model repository, or several served together
    http_port: int = 0
    grpc_port: int = 0
    models: list[str] = field(default_factory=lambda: ["*"])
    host: str = "127.0.0.1"
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    _workdir: Path | None = field(default=None, repr=False)
    _log: Path | None = field(default=None, repr=False)  # this run's log: log_path, or one in the work dir

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, backend_dir: Path) -> list[str]:
        server, _ = pytriton_dist()
        return [
            str(server / "bin" / "tritonserver"),
            *[f"--model-repository={path.resolve()}" for path in self.repositories],
            f"--backend-directory={backend_dir}",
            f"--cache-directory={server / 'caches'}",
            "--model-control-mode=explicit",
            *[f"--load-model={model}" for model in self.models],
            "--exit-timeout-secs=1",
            "--strict-readiness=true",
            "--allow-metrics=false",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--exit-on-error=true",
            # The key of a tiered model's request, and nothing else the client sends in a header.
            f"--http-header-forward-pattern={FORWARDED_HEADERS}",
            f"--grpc-header-forward-pattern={FORWARDED_HEADERS}",
        ]

    def start(self, timeout: float = START_TIMEOUT_S) -> TritonServer:
        missing = [str(path) for path in self.repositories if not Path(path).is_dir()]
        if missing:
            raise TritonServerError(f"model repository {missing[0]} does not exist: run `make triton MODEL=...` first")
        self.check_ports()
        free = iter(free_ports(2))
        self.http_port, self.grpc_port = self.http_port or next(free), self.grpc_port or next(free)
        return self._start(timeout)

    def check(self) -> None:
        """Refuses, before anything starts or prints, a port (not 0) that another process listens on,
        and a log that another server still writes."""
        self.check_ports()
        if self.log_path is not None and Path(self.log_path).exists():
            _own_log(Path(self.log_path), truncate=False).close()

    def check_ports(self) -> None:
        """Refuses, before anything starts, a port (not 0) that another process listens on."""
        for label, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port)):
            if port and not port_free(self.host, port):
                raise TritonServerError(
                    f"{label} port {port} on {self.host} is in use (another server, perhaps an `aim serve` already "
                    f"running): stop that one, or choose another port (--{label.lower()}-port; 0 takes any free one)"
                )

    @property
    def repositories(self) -> list[Path]:
        return [Path(self.repository)] if isinstance(self.repository, (str, os.PathLike)) else list(self.repository)

    def _start(self, timeout: float) -> TritonServer:
        self._workdir = Path(tempfile.mkdtemp(prefix="aim-triton-"))
        self._log = Path(self.log_path or self._workdir / "tritonserver.log")
        try:
            log = _own_log(self._log)  # before anything starts: another server's log is never overwritten
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            raise
        with log:
            backend_dir = make_backend_dir(self._workdir / "backends")
            self.process = subprocess.Popen(
                self.command(backend_dir),
                env=server_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends the stubs too
            )  # the server shares the open log, and so its lock, until it exits
        try:
            self._wait_ready(timeout)
        except BaseException:  # also Ctrl-C while starting: no server left behind
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} while starting:\n{self.errors()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise TritonServerError(f"tritonserver was not ready within {timeout:.0f} s:\n{self.errors()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def models_ready(self) -> list[str]:
        """Names of the loaded models (the repository index, READY only)."""
        import json

        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            index = json.loads(response.read())
        return sorted(entry["name"] for entry in index if entry.get("state") == "READY")

    def log(self) -> str:
        try:
            return Path(self._log).read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def errors(self) -> str:
        """The server's error lines (glog level E, `error:`), or its last lines if it logged none."""
        lines = self.log().splitlines()
        wanted = [line for line in lines if line[:1] == "E" and line[1:5].isdigit() or line.startswith("error:")]
        wanted = [line for line in wanted if "CudaDriverHelper" not in line]  # every start without a GPU says this
        return "\n".join(wanted or lines[-20:]) + (f"\n(full log: {self.log_path})" if self.log_path else "")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGINT (Triton's clean shutdown), then SIGKILL to the whole group if it lingers."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGINT)
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # stubs left behind by a crash
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        if self._workdir is not None:  # the backend copies, and the log unless it was asked elsewhere
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
