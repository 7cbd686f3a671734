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
    import uvicorn

    from kb.server import create_app  # heavy: torch and gradio, only for the server
    from kb.settings import Settings  # pydantic: not for `kb --help`

    s = Settings()
    host, port = args.host or s.host, args.port or s.port
    app = create_app()
    print(
        f"kb is serving on http://{host}:{port}  (web app: /, API docs: /docs)",
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
    return 0


def register(sub) -> None:
    model = sub.add_parser("model", help="the model").add_subparsers(dest="sub", required=True)
    model.add_parser("fetch", help="fetch and convert the demo model").set_defaults(
        func=cmd_model_fetch
    )

    c = sub.add_parser("serve", help="start the HTTP API")
    c.add_argument("--host", default=None)
    c.add_argument("--port", type=int, default=None)
    c.set_defaults(func=cmd_serve)
