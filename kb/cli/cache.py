"""`kb cache list|pin|unpin|evict|move|rebuild|delete|status`: where corpora's shared KV lives.

Mutating commands print an event id at once; `--wait` prints the outcome instead. Tier moves act
on the KV of the process that runs them: with `--server URL` (or `KB_SERVER`) the command goes to a
running server's `POST /v1/cache/{name}/{op}` (API key from `KB_API_KEY` when sign-in is on), so
`kb cache evict` frees that server's memory; without it, it acts in this process, which holds no
KV. Pin, unpin, rebuild and delete act through the database for every process either way.
"""

from __future__ import annotations

import json
import sys

from kb.cli.common import command_group, print_json_or_empty, subcommand
from kb.cli.common import human_size as _size
from kb.cli.common import knowledge_base as _kb
from kb.cli.names import require_corpus, require_job
from kb.cli.server_client import ServerClient, explicit_url


def cmd_cache_list(args) -> int:
    if args.name:
        require_corpus(args.name)
    rows = _kb().cache_admin.lookup(args.name)
    if print_json_or_empty(rows, args.json, "no corpora yet: kb corpus create NAME"):
        return 0
    print(
        f"{'NAME':24} {'STATE':9} {'TIER':5} {'TOKENS':>8} {'GPU':>10} {'CPU':>10} {'DISK':>10} {'HITS':>6}  LAST USE"
    )
    for r in rows:
        last = r.last_used_at.strftime("%Y-%m-%d %H:%M:%S") if r.last_used_at else "-"
        print(
            f"{r.name:24} {r.state:9} {r.tier:5} {r.tokens:8d} {_size(r.bytes['gpu']):>10} "
            f"{_size(r.bytes['cpu']):>10} {_size(r.bytes['disk']):>10} {r.hits:6d}  {last}"
        )
    return 0


def _server(args) -> ServerClient | None:
    url = explicit_url(args)
    return ServerClient(url) if url else None


def _print_event_dict(ev: dict) -> None:
    if ev["status"] == "failed":
        print(f"{ev['op']} {ev['corpus']}: failed: {ev['error']}", file=sys.stderr)
    else:
        print(
            f"{ev['op']} {ev['corpus']}: {ev['status']} {json.dumps(ev['result']) if ev['result'] else ''}".rstrip()
        )


def _submit(args, op: str) -> int:
    server = _server(args)
    if server is not None:
        event_id = server.submit(op, args.name, getattr(args, "tier", None))
        if not args.wait:
            print(event_id)
            return 0
        ev = server.wait(event_id)
        _print_event_dict(ev)
        return 1 if ev["status"] == "failed" else 0
    require_corpus(args.name)
    kb = _kb()
    event_id = kb.cache_admin.submit(op, args.name, getattr(args, "tier", None))
    if not args.wait:
        print(event_id)
        return 0
    ev = kb.cache_admin.wait(event_id)
    _print_event_dict(ev.to_dict())
    return 1 if ev.status == "failed" else 0


def cmd_cache_status(args) -> int:
    server = _server(args)
    if server is None:
        require_job(args.event_id, "cache", f"no cache event {args.event_id!r}")
        ev = _kb().cache_admin.event(args.event_id).to_dict()
    else:
        ev = server.event(args.event_id)
    if args.json:
        print(json.dumps(ev, indent=2))
    else:
        _print_event_dict(ev)
    return 0


def register(sub) -> None:
    cache = command_group(sub, "cache", "inspect and manage corpora's cached KV")
    subcommand(
        cache,
        "list",
        cmd_cache_list,
        "per corpus: tokens, bytes per tier, hits, last use, state",
        optional="name",
        json=True,
    )
    helps = {
        "pin": "never evict this corpus's KV",
        "unpin": "let it be evicted again",
        "evict": "drop its KV from memory (it stays on disk)",
        "rebuild": "recompute what no longer matches the settings, reusing the rest",
        "delete": "delete the corpus, its documents and its KV",
    }

    def server_arg(c) -> None:
        c.add_argument(
            "--server",
            help="a running server's URL (default: $KB_SERVER); without it the "
            "command acts in this process, which holds no KV",
        )

    for op, text in helps.items():
        c = cache.add_parser(op, help=text)
        c.add_argument("name")
        c.add_argument("--wait", action="store_true", help="wait and print the outcome")
        server_arg(c)
        c.set_defaults(func=lambda args, op=op: _submit(args, op))
    c = cache.add_parser("move", help="move its KV to a tier")
    c.add_argument("name")
    c.add_argument("--tier", required=True, choices=("gpu", "cpu", "disk"))
    c.add_argument("--wait", action="store_true", help="wait and print the outcome")
    server_arg(c)
    c.set_defaults(func=lambda args: _submit(args, "move"))
    c = subcommand(
        cache,
        "status",
        cmd_cache_status,
        "an operation's status by its event id",
        "event_id",
        json=True,
    )
    server_arg(c)
