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
    import os

    from kb.settings import Settings  # pydantic: not for `kb --help`

    s = Settings()
    ranks = s.shared_ranks if args.shared_ranks is None else args.shared_ranks
    # under torchrun with one process, --shared-ranks 0: rank 0 is its own shared rank
    loopback = args.shared_ranks == 0 and "RANK" in os.environ
    if ranks or loopback:
        return serve_sharded(args, s, ranks)
    from kb.server import create_app  # heavy: torch and gradio, only for the server

    _run(create_app(), args, s)
    return 0


def serve_sharded(args, s, ranks: int) -> int:
    """One process of a `kb serve --shared-ranks S` job (torchrun's env:// variables, world size
    S + 1): rank 0 serves the API and the web app over corpora whose shared KV the other ranks
    hold; ranks 1..S run the shared-rank loop until rank 0 says shutdown or is gone (with
    `--shared-ranks 0` under torchrun, one process, rank 0 is its own shared rank:
    `LoopbackLink`, a check of the sharded path on one device). Started
    outside such a job (no RANK in the environment), it is rank 0 of a one-host job and starts
    ranks 1..S itself (`spawn_shared_ranks`), restarting one that dies (`Supervisor`). A shared
    rank started again by hand (the same command and variables) is taken back too."""
    import logging
    import os

    spawned = "RANK" not in os.environ and ranks > 0
    supervisor = Supervisor(ranks, s.shared_rank_restart_s) if spawned else None

    from kb.engine.distributed.loopback import LoopbackLink
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

    budget = int(s.gpu_cache_gb * 2**30)
    link = (LoopbackLink if ranks == 0 else ShardLink)(world, rank_budget_bytes=budget)
    if supervisor is not None:
        supervisor.watch(link)
    try:
        _run(create_app(KnowledgeBase(s, link)), args, s, f"; shared KV on {ranks} ranks")
    finally:
        link.shutdown()
        if supervisor is not None:  # told to exit (or rank 0's sockets closed): they end soon
            supervisor.stop(s.shared_rank_timeout_s)
    return 0


def spawn_shared_ranks(ranks: int) -> dict:
    """Start ranks 1..`ranks` of a one-host job as child processes of this one (rank 0), each
    `kb serve --shared-ranks` with the variables torchrun would set; returns rank -> process.
    Unlike torchrun's agent, nothing stops this process when a shared rank dies: the service
    serves on. The children have their own session (Ctrl-C reaches rank 0, which tells them to
    exit) and exit by themselves when rank 0 is gone."""
    import os
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous store rank 0 hosts
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    job = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(ranks + 1),
    }
    os.environ.update(job, RANK="0", LOCAL_RANK="0")
    return {r: start_shared_rank(r, ranks) for r in range(1, ranks + 1)}


def start_shared_rank(rank: int, ranks: int):
    """Shared rank `rank` of this one-host job, as a child process (rank 0's job variables)."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "kb.cli", "serve", "--shared-ranks", str(ranks)]
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank)}
    return subprocess.Popen(cmd, env=env, start_new_session=True)


class Supervisor:
    """Rank 0's keeper of the shared ranks it started: one that exits is started again (after
    `restart_s`, KB_SHARED_RANK_RESTART_S, doubling while it keeps dying within a minute, at
    most 60 s), and one the link lost
    whose process still runs (hung: its heartbeat stopped, a minute after it started) is killed
    first. The restarted rank
    waits in the lobby and the link takes it back (docs/SCALING.md)."""

    def __init__(self, ranks: int, restart_s: float = 1.0):
        import threading

        self.ranks, self.restart_s = ranks, restart_s
        self.children = spawn_shared_ranks(ranks)
        self.restarts = {r: 0 for r in self.children}
        self._link = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kb-supervisor", daemon=True)

    def watch(self, link) -> None:
        self._link = link
        self._thread.start()

    def _loop(self) -> None:
        import time

        backoff = {r: self.restart_s for r in self.children}
        started = {r: time.monotonic() for r in self.children}
        while not self._stopping.wait(0.2):
            link = self._link
            for r, child in list(self.children.items()):
                lost = r not in link.members and link.error is not None
                if child.poll() is None and lost and self._hung(r, started[r]):
                    print(f"kb: shared rank {r} is hung; killing it", file=sys.stderr, flush=True)
                    child.kill()
                    child.wait()
                if child.poll() is None:
                    continue
                if time.monotonic() - started[r] > 60:
                    backoff[r] = self.restart_s
                if self._stopping.wait(backoff[r]):
                    return
                backoff[r] = min(60.0, max(1.0, backoff[r] * 2))
                print(
                    f"kb: shared rank {r} exited ({child.returncode}); starting it again",
                    file=sys.stderr,
                    flush=True,
                )
                self.children[r] = start_shared_rank(r, self.ranks)
                self.restarts[r] += 1
                started[r] = time.monotonic()

    def _hung(self, rank: int, since: float) -> bool:
        """Running for over a minute (past any start) and its heartbeat still for a few
        periods: stopped or stuck, not starting."""
        import time

        from kb.engine.distributed.protocol import HEARTBEAT_S

        if time.monotonic() - since < 60:
            return False
        store, key = self._link.world.store, self._link.world.heartbeat_key(rank)
        before = store.add(key, 0)
        time.sleep(4 * HEARTBEAT_S)
        return store.add(key, 0) == before

    def stop(self, timeout_s: float) -> None:
        import subprocess

        self._stopping.set()
        for child in self.children.values():
            try:
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()


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
