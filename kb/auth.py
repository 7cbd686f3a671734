"""Users, passwords, API keys, session tokens and who may read or change which corpus.

Passwords are hashed with the standard library's scrypt (no extra dependency). API keys are
shown once; only their sha256 and a short prefix are stored. Session cookies are signed
tokens (user id, expiry, HMAC with a secret kept in KB_HOME), and the signature also covers
the user's password hash, so changing a password signs the user out everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from kb.errors import Conflict, KBError, NotFound
from kb.settings import Settings
from storage.db import Database
from storage.models import ApiKey, Corpus, CorpusShare, User, utcnow

VISIBILITIES = ("private", "public", "shared")
KEY_PREFIX = "kb_"
SESSION_COOKIE = "kb_session"
SESSION_TTL_S = 14 * 24 * 3600
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class Unauthorized(KBError):
    status = 401


class Forbidden(KBError):
    status = 403


@dataclass(frozen=True)
class Principal:
    """Who makes a request: a signed-in user, or the anonymous user of KB_AUTH=off (id None)."""

    id: int | None
    name: str
    is_admin: bool = False

    @property
    def anonymous(self) -> bool:
        return self.id is None


ANONYMOUS = Principal(None, "anonymous", False)


# -- passwords --------------------------------------------------------------------------------
def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash` (hex), salted per password."""
    if not password:
        raise KBError("the password is empty")
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if algo != "scrypt":
        return False
    got = hashlib.scrypt(
        password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32
    )
    return hmac.compare_digest(got.hex(), digest)


def _principal(u: User) -> Principal:
    return Principal(u.id, u.name, bool(u.is_admin))


# -- users and keys -----------------------------------------------------------------------------
def create_user(db: Database, name: str, password: str, admin: bool = False) -> Principal:
    name = (name or "").strip()
    if not name or len(name) > 64:
        raise KBError("a user name is 1-64 characters")
    with db.session() as s:
        if s.scalar(select(User).where(User.name == name)) is not None:
            raise Conflict(f"user {name!r} already exists")
        u = User(name=name, password_hash=hash_password(password), is_admin=admin)
        s.add(u)
        s.flush()
        return _principal(u)


def set_password(db: Database, name: str, password: str) -> None:
    with db.session() as s:
        u = s.scalar(select(User).where(User.name == name))
        if u is None:
            raise NotFound(f"user {name!r} does not exist")
        u.password_hash = hash_password(password)


def authenticate(db: Database, name: str, password: str) -> Principal | None:
    """The user if the password matches, else None (same answer for unknown names)."""
    with db.session() as s:
        u = s.scalar(select(User).where(User.name == (name or "").strip()))
        if u is None:
            verify_password(password or "x", hash_password("timing"))  # same cost either way
            return None
        return _principal(u) if verify_password(password or "", u.password_hash) else None


def get_user(db: Database, user_id: int) -> Principal | None:
    with db.session() as s:
        u = s.get(User, user_id)
        return _principal(u) if u is not None else None


def list_users(db: Database) -> list[Principal]:
    with db.session() as s:
        return [_principal(u) for u in s.scalars(select(User).order_by(User.name))]


def create_api_key(db: Database, user_name: str, label: str = "") -> str:
    """A new key for the user; returned once, stored as its sha256 and a prefix."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.session() as s:
        u = s.scalar(select(User).where(User.name == user_name))
        if u is None:
            raise NotFound(f"user {user_name!r} does not exist")
        s.add(
            ApiKey(
                user_id=u.id,
                prefix=key[:10],
                key_hash=hashlib.sha256(key.encode()).hexdigest(),
                name=label[:64],
            )
        )
    return key


@dataclass(frozen=True)
class KeyInfo:
    """What an admin sees of an API key: never the key, only the prefix that names it."""

    prefix: str
    label: str
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool


def list_api_keys(db: Database, user_name: str) -> list[KeyInfo]:
    """The user's keys, oldest first."""
    with db.session() as s:
        u = s.scalar(select(User).where(User.name == user_name))
        if u is None:
            raise NotFound(f"user {user_name!r} does not exist")
        rows = s.scalars(select(ApiKey).where(ApiKey.user_id == u.id).order_by(ApiKey.id))
        return [KeyInfo(r.prefix, r.name, r.created_at, r.last_used_at, r.revoked) for r in rows]


def revoke_api_key(db: Database, prefix: str) -> str:
    """Revoke the one key whose stored prefix starts with `prefix` (at least 6 characters, `kb_`
    included); returns its owner's name. The key stops working at once; its row stays for the
    record."""
    if len(prefix) < 6:
        raise KBError(
            "give at least the first 6 characters of the key (as `kb user keys` lists them)"
        )
    with db.session() as s:
        rows = list(
            s.scalars(select(ApiKey).where(ApiKey.prefix.startswith(prefix[:10], autoescape=True)))
        )
        if not rows:
            raise NotFound(f"no API key starts with {prefix!r}")
        if len(rows) > 1:
            raise Conflict(f"{len(rows)} keys start with {prefix!r}: give more of it")
        rows[0].revoked = True
        return s.get(User, rows[0].user_id).name


def verify_api_key(db: Database, key: str) -> Principal | None:
    if not key or not key.startswith(KEY_PREFIX):
        return None
    digest = hashlib.sha256(key.encode()).hexdigest()
    with db.session() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked.is_(False)))
        if row is None:
            return None
        row.last_used_at = utcnow()
        u = s.get(User, row.user_id)
        return _principal(u) if u is not None else None


# -- session tokens -----------------------------------------------------------------------------
def session_secret(home: Path) -> bytes:
    """A random secret made once per KB home (mode 0600), so sessions survive restarts."""
    path = home / "session.secret"
    home.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: of two processes starting at once, one writes and both read the same
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    while len(data := path.read_bytes()) < 32:  # the other process is still writing it
        time.sleep(0.01)
    return data


def _sign(secret: bytes, uid: int, exp: int, password_hash: str) -> str:
    return hmac.new(secret, f"{uid}.{exp}.{password_hash}".encode(), hashlib.sha256).hexdigest()


def make_session_token(
    db: Database, secret: bytes, user: Principal, ttl_s: int = SESSION_TTL_S
) -> str:
    assert user.id is not None, "the anonymous user has no session"
    with db.session() as s:
        u = s.get(User, user.id)
        exp = int(time.time()) + ttl_s
        return f"{u.id}.{exp}.{_sign(secret, u.id, exp, u.password_hash)}"


def verify_session_token(db: Database, secret: bytes, token: str) -> Principal | None:
    try:
        uid_s, exp_s, sig = token.split(".")
        uid, exp = int(uid_s), int(exp_s)
    except (AttributeError, ValueError):
        return None
    if exp < time.time():
        return None
    with db.session() as s:
        u = s.get(User, uid)
        if u is None or not hmac.compare_digest(sig, _sign(secret, uid, exp, u.password_hash)):
            return None
        return _principal(u)


# -- access -----------------------------------------------------------------------------------
def is_admin(user: Principal) -> bool:
    return user.is_admin


def can_read(s: Session, user: Principal, corpus: Corpus) -> bool:
    """Admins and owners read everything of theirs; public corpora are for all; shared ones
    for the named users."""
    if user.is_admin or corpus.visibility == "public":
        return True
    if user.id is None:
        return False
    if corpus.owner_id == user.id:
        return True
    if corpus.visibility == "shared":
        return (
            s.scalar(
                select(CorpusShare).where(
                    CorpusShare.corpus_id == corpus.id, CorpusShare.user_id == user.id
                )
            )
            is not None
        )
    return False


def can_write(user: Principal, corpus: Corpus) -> bool:
    """Owners and admins change a corpus; unowned corpora (made anonymously) by anonymous users."""
    if user.is_admin:
        return True
    if user.id is None:
        return corpus.owner_id is None
    return corpus.owner_id == user.id


def check_read(s: Session, user: Principal, corpus: Corpus) -> None:
    """Raise NotFound for a corpus the user may not read (its existence is not revealed)."""
    if not can_read(s, user, corpus):
        raise NotFound(f"corpus {corpus.name!r} does not exist")


def check_write(s: Session, user: Principal, corpus: Corpus) -> None:
    check_read(s, user, corpus)
    if not can_write(user, corpus):
        raise Forbidden(f"only the owner of corpus {corpus.name!r} or an admin may change it")


def set_visibility(
    db: Database, user: Principal, name: str, visibility: str, share_with: list[str] | None = None
) -> None:
    """Make a corpus private, public, or shared with the named users (replacing the list)."""
    if visibility not in VISIBILITIES:
        raise KBError(f"visibility is one of {', '.join(VISIBILITIES)}")
    with db.session() as s:
        corpus = s.scalar(select(Corpus).where(Corpus.name == name))
        if corpus is None:
            raise NotFound(f"corpus {name!r} does not exist")
        check_write(s, user, corpus)
        corpus.visibility = visibility
        for old in s.scalars(select(CorpusShare).where(CorpusShare.corpus_id == corpus.id)):
            s.delete(old)
        s.flush()
        if visibility == "shared":
            for uname in dict.fromkeys(n.strip() for n in share_with or [] if n.strip()):
                u = s.scalar(select(User).where(User.name == uname))
                if u is None:
                    raise NotFound(f"user {uname!r} does not exist")
                s.add(CorpusShare(corpus_id=corpus.id, user_id=u.id))


def readable_names(db: Database, user: Principal) -> set[str]:
    """Names of the corpora this user may read."""
    with db.session() as s:
        return {c.name for c in s.scalars(select(Corpus)) if can_read(s, user, c)}


# -- who is calling (shared by the HTTP API and the web app) ----------------------------------
class AuthContext(Protocol):
    """What resolving a caller needs of the knowledge base: its settings, database and home."""

    settings: Settings
    db: Database
    home: Path


_secrets: dict[Path, bytes] = {}


def auth_on(kb: AuthContext) -> bool:
    """Whether sign-in is required (KB_AUTH=on)."""
    return kb.settings.auth == "on"


def secret_of(kb: AuthContext) -> bytes:
    """The session cookies' signing secret of this home, read once per process."""
    home = kb.home
    if home not in _secrets:
        _secrets[home] = session_secret(home)
    return _secrets[home]


def resolve(
    kb: AuthContext, headers: Mapping[str, str], cookies: Mapping[str, str]
) -> Principal | None:
    """The signed-in user named by a bearer key or session cookie, or None."""
    authz = headers.get("authorization") or ""
    if authz.lower().startswith("bearer "):
        user = verify_api_key(kb.db, authz[7:].strip())
        if user is not None:
            return user
    token = cookies.get(SESSION_COOKIE)
    if token:
        return verify_session_token(kb.db, secret_of(kb), token)
    return None


def principal_for(
    kb: AuthContext, headers: Mapping[str, str], cookies: Mapping[str, str]
) -> Principal:
    """The caller, anonymous when auth is off and no credentials are given; else 401."""
    user = resolve(kb, headers, cookies)
    if user is not None:
        return user
    if auth_on(kb):
        raise Unauthorized("sign in, or send `Authorization: Bearer <API key>` (kb user key NAME)")
    return ANONYMOUS
