"""Text checks shared by the HTTP API and the web app: no NUL byte, no lone surrogate and no
control character (tab and newlines aside in free text) reaches the engine or the database; and
the request id under which a failure's details are logged for the admin.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Annotated, Any

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from kb.errors import KBError

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # free text keeps \t \n \r
_CONTROL_ANY = re.compile(r"[\x00-\x1f\x7f]")  # names, ids, paths: no control character at all
request_id: ContextVar[str | None] = ContextVar("kb_request_id", default=None)


def text_problem(value: str, single_line: bool = False) -> str | None:
    """Why `value` may not be stored or tokenized, or None when it is fine."""
    if "\x00" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode text)"
    if (_CONTROL_ANY if single_line else _CONTROL).search(value):
        return "contains a control character"
    return None


def check_text(value: Any, field: str, single_line: bool = False) -> Any:
    """Raise KBError (400) naming `field` if any string in `value` (at any depth) is bad."""
    if isinstance(value, str):
        problem = text_problem(value, single_line)
        if problem:
            raise KBError(f"{field} {problem}")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, field, single_line)
            check_text(
                v,
                f"{field}.{k}" if isinstance(k, str) and not text_problem(k) else field,
                single_line,
            )
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text(v, f"{field}[{i}]", single_line)
    return value


def _validator(single_line: bool):
    def check(value: str) -> str:
        problem = text_problem(value, single_line)
        if problem:
            raise PydanticCustomError("bad_text", problem)
        return value

    return check


# the served OpenAPI schema states the same rule as a pattern (schema only; the check is ours)
_TEXT_SCHEMA = Field(json_schema_extra={"pattern": "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f]*$"})
_NAME_SCHEMA = Field(json_schema_extra={"pattern": "^[^\\x00-\\x1f\\x7f]*$"})
Text = Annotated[str, AfterValidator(_validator(False)), _TEXT_SCHEMA]  # free text: questions
Name = Annotated[str, AfterValidator(_validator(True)), _NAME_SCHEMA]  # one line: names, stops


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def internal_message(what: str, detail: str | None = None) -> str:
    """A user-facing line for a failure whose details are for the admin: logged with an id."""
    rid = request_id.get() or new_request_id()
    log.error("request %s: %s: %s", rid, what, detail)
    return f"{what} (request id {rid})"
