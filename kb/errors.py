"""Errors a user sees: one line each, with the HTTP status the API answers with."""

from __future__ import annotations


class KBError(Exception):
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(KBError):
    status = 404


class Conflict(KBError):
    status = 409


class NotReady(KBError):
    status = 409


class TooBusy(KBError):
    status = 429
