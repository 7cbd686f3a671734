"""`kb user add NAME [--admin] [--password-stdin]`, `kb user key NAME`, `kb user keys NAME`,
`kb user revoke PREFIX`, `kb user list`."""

from __future__ import annotations

import getpass
import sys

from kb.cli.common import database
from kb.cli.names import require_user
from kb.errors import KBError


def _read_password(args) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise KBError("the passwords differ")
    if len(password) < 8:
        raise KBError("a password has at least 8 characters")
    return password


def cmd_user_add(args) -> int:
    from kb.auth import create_user  # SQLAlchemy: not for `kb --help`

    user = create_user(database(), args.name, _read_password(args), admin=args.admin)
    print(f"created user {user.name}{' (admin)' if user.is_admin else ''}")
    return 0


def cmd_user_password(args) -> int:
    require_user(args.name)
    from kb.auth import set_password  # SQLAlchemy: not for `kb --help`

    set_password(database(), args.name, _read_password(args))
    print(f"password of {args.name} changed; their sessions end")
    return 0


def cmd_user_key(args) -> int:
    require_user(args.name)
    from kb.auth import create_api_key  # SQLAlchemy: not for `kb --help`

    key = create_api_key(database(), args.name, args.label)
    print(key)
    print(
        "shown once: only its hash is stored. Use it as `Authorization: Bearer <key>`.",
        file=sys.stderr,
    )
    return 0


def cmd_user_keys(args) -> int:
    require_user(args.name)
    from kb.auth import list_api_keys  # SQLAlchemy: not for `kb --help`

    keys = list_api_keys(database(), args.name)
    if not keys:
        print(f"{args.name} has no API keys: kb user key {args.name}")
    for k in keys:
        used = k.last_used_at.strftime("%Y-%m-%d %H:%M") if k.last_used_at else "never used"
        state = "revoked" if k.revoked else "active"
        print(
            f"{k.prefix}...  {state:7s}  created {k.created_at:%Y-%m-%d %H:%M}  {used:16s}  {k.label}"
        )
    return 0


def cmd_user_revoke(args) -> int:
    from kb.auth import revoke_api_key  # SQLAlchemy: not for `kb --help`

    owner = revoke_api_key(database(), args.prefix)
    print(f"revoked the key {args.prefix}... of {owner}: it no longer signs in")
    return 0


def cmd_user_list(args) -> int:
    from kb.auth import list_users  # SQLAlchemy: not for `kb --help`

    users = list_users(database())
    if not users:
        print("no users yet: kb user add NAME --admin")
    for u in users:
        print(f"{u.name}{'  admin' if u.is_admin else ''}")
    return 0


def register(sub) -> None:
    user = sub.add_parser("user", help="users, passwords and API keys").add_subparsers(
        dest="sub", required=True
    )
    c = user.add_parser("add", help="add a user (asks for the password)")
    c.add_argument("name")
    c.add_argument("--admin", action="store_true", help="may manage caches and every corpus")
    c.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    c.set_defaults(func=cmd_user_add)
    c = user.add_parser("password", help="set a user's password")
    c.add_argument("name")
    c.add_argument("--password-stdin", action="store_true")
    c.set_defaults(func=cmd_user_password)
    c = user.add_parser("key", help="print a new API key for a user")
    c.add_argument("name")
    c.add_argument("--label", default="", help="a note to recognise the key by")
    c.set_defaults(func=cmd_user_key)
    c = user.add_parser(
        "keys", help="list a user's API keys (prefix, state, last use; never the key)"
    )
    c.add_argument("name")
    c.set_defaults(func=cmd_user_keys)
    c = user.add_parser(
        "revoke", help="revoke an API key by its prefix (as `kb user keys` shows it)"
    )
    c.add_argument("prefix")
    c.set_defaults(func=cmd_user_revoke)
    c = user.add_parser("list", help="list users")
    c.set_defaults(func=cmd_user_list)
