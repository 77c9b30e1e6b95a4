"""aim serve build/triton: the Triton server on a model repository (Ctrl-C or SIGTERM stops it)."""

from __future__ import annotations

import sys
from pathlib import Path

from aim.cli import args as shared
from aim.errors import AimError


def add(sub) -> None:
    p = sub.add_parser("serve", help="run the Triton server on a model repository")
    p.add_argument("repository", nargs="?", default="build/triton")
    p.add_argument("--model", action="append", help="load only this model (repeatable; default: all)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)"
    )
    p.add_argument("--http-port", type=shared.port, default=8000, help="0: any free port")
    p.add_argument("--grpc-port", type=shared.port, default=8001, help="0: any free port")
    p.set_defaults(func=run)


def run(args) -> int:
    import signal
    import threading

    from aim.serving.front import TIERS
    from aim.serving.server import TritonServer

    repository = Path(args.repository)
    if repository.is_dir() and not any(repository.glob("*/config.pbtxt")):
        raise AimError(
            f"{repository} holds no model (no <model>/config.pbtxt): write one with `aim triton build/MODEL "
            f"--repository {repository}`"
        )
    log = repository.with_name(repository.name + ".log")  # kept after the server stops
    server = TritonServer(
        repository, args.http_port, args.grpc_port, models=args.model or ["*"], host=args.host, log_path=log
    )
    server.check()  # a port in use, another server's log: one error line, before anything starts
    print(f"starting tritonserver on {args.repository} ...", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # Ctrl-C: KeyboardInterrupt, the with block stops the server
    try:
        with server:
            print(f"HTTP  http://{server.http_url}   (health: http://{server.http_url}/v2/health/ready)")
            print(f"gRPC  {server.grpc_url}")
            print(
                f"models: {', '.join(server.models_ready())}; log: {server.log_path}. Ctrl-C stops the server.",
                flush=True,
            )
            tiered = sorted(p.parent.parent.name for p in repository.glob(f"*/*/{TIERS}"))
            if tiered:
                print(f"tiered: {', '.join(tiered)} (the tier of a request is its key's: Authorization: Bearer KEY)")
            while not stop.is_set() and server.running():
                stop.wait(0.5)
            if not server.running():
                print(f"tritonserver exited:\n{server.log()[-2000:]}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass  # the with block has stopped the server
    print("stopped")
    return 0
