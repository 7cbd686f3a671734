"""`kb serve` and `kb model fetch`."""

from __future__ import annotations

import sys

from kb.model.demo import DEMO_NAME, ensure_demo_model


def cmd_model_fetch(args) -> int:
    from kb.settings import Settings  # pydantic: not for `kb --help`

    s = Settings()
    if s.model != DEMO_NAME:
        print(f"KB_MODEL is {s.model}: nothing to fetch", file=sys.stderr)
        return 0
    folder = ensure_demo_model(s.resolved_models_dir)
    print(f"demo model ready: {folder}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from kb.settings import Settings  # pydantic: not for `kb --help`

    s = Settings()
    ranks = s.shared_ranks if args.shared_ranks is None else args.shared_ranks
    if ranks:
        return serve_sharded(args, s, ranks)
    from kb.server import create_app  # heavy: torch and gradio, only for the server

    _run(create_app(), args, s)
    return 0


def serve_sharded(args, s, ranks: int) -> int:
    """One process of a `kb serve --shared-ranks S` job (torchrun's env:// variables, world size
    S + 1): rank 0 serves the API and the web app over corpora whose shared KV the other ranks
    hold; ranks 1..S run the shared-rank loop until rank 0 says shutdown or is gone. Started
    outside such a job (no RANK in the environment), it is rank 0 of a one-host job and starts
    ranks 1..S itself (`spawn_shared_ranks`)."""
    import logging
    import os
    import subprocess

    children = spawn_shared_ranks(ranks) if "RANK" not in os.environ else []

    from kb.engine.distributed.protocol import ShardLink, init_world
    from kb.engine.distributed.worker import run_shared_rank

    backend = "nccl" if s.device.startswith("cuda") else "gloo"
    world = init_world("env://", backend=backend, timeout_s=s.shared_rank_timeout_s)
    if world.world_size != ranks + 1:
        raise SystemExit(
            f"--shared-ranks {ranks} needs a world of {ranks + 1} processes, "
            f"the job has {world.world_size}"
        )
    if world.rank != 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        try:
            run_shared_rank(world)
        except Exception as e:  # noqa: BLE001 - rank 0 is gone: nothing left to serve
            print(f"shared rank {world.rank}: rank 0 is gone ({e}); exiting", file=sys.stderr)
            return 1
        return 0
    from kb.server import create_app
    from kb.service import KnowledgeBase

    link = ShardLink(world)
    try:
        _run(create_app(KnowledgeBase(s, link)), args, s, f"; shared KV on {ranks} ranks")
    finally:
        link.shutdown()
        for child in children:  # told to exit (or rank 0's sockets closed): they end soon
            try:
                child.wait(timeout=s.shared_rank_timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


def spawn_shared_ranks(ranks: int) -> list:
    """Start ranks 1..`ranks` of a one-host job as child processes of this one (rank 0), each
    `kb serve --shared-ranks` with the variables torchrun would set. Unlike torchrun's agent,
    nothing stops this process when a shared rank dies: the service serves on from rank 0. The
    children have their own session (Ctrl-C reaches rank 0, which tells them to exit) and exit
    by themselves when rank 0 is gone."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:  # a free port for the rendezvous store rank 0 hosts
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    job = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(ranks + 1),
    }
    os.environ.update(job, RANK="0", LOCAL_RANK="0")
    cmd = [sys.executable, "-m", "kb.cli", "serve", "--shared-ranks", str(ranks)]
    return [
        subprocess.Popen(
            cmd, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r)}, start_new_session=True
        )
        for r in range(1, ranks + 1)
    ]


def _run(app, args, s, extra: str = "") -> None:
    import uvicorn

    host, port = args.host or s.host, args.port or s.port
    print(
        f"kb is serving on http://{host}:{port}  (web app: /, API docs: /docs){extra}",
        file=sys.stderr,
        flush=True,
    )
    if s.auth != "on":
        print(
            "sign-in is off (KB_AUTH=off): anyone who reaches this port uses public corpora. To turn it on:\n"
            "  kb user add NAME --admin && KB_AUTH=on kb serve",
            file=sys.stderr,
            flush=True,
        )
    # a bounded shutdown: connections get shutdown_grace_s, then their handlers are cancelled
    # (each aborts its request) and the engine aborts whatever is left
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=int(s.shutdown_grace_s) + 1,
    )


def register(sub) -> None:
    model = sub.add_parser("model", help="the model").add_subparsers(dest="sub", required=True)
    model.add_parser("fetch", help="fetch and convert the demo model").set_defaults(
        func=cmd_model_fetch
    )

    c = sub.add_parser("serve", help="start the HTTP API")
    c.add_argument("--host", default=None)
    c.add_argument("--port", type=int, default=None)
    c.add_argument(
        "--shared-ranks",
        type=int,
        default=None,
        help="ranks holding the shared KV (under torchrun, world size S + 1; default "
        "KB_SHARED_RANKS, 0: one process); docs/SCALING.md",
    )
    c.set_defaults(func=cmd_serve)
