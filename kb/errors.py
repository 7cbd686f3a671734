"""Errors a user sees: one line each, with the HTTP status the API answers with."""

from __future__ import annotations


class KBError(Exception):
    """`param`: the request field at fault, `code`: a short machine-readable reason (the API
    answers both in OpenAI's error envelope)."""

    status = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class NotFound(KBError):
    status = 404


class Conflict(KBError):
    status = 409


class NotReady(KBError):
    status = 409


class TooBusy(KBError):
    status = 429
