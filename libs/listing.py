"""List requests: a small AIP-160 filter subset, ``order_by``, and opaque keyset page tokens.

Page tokens are signed (HMAC-SHA256, truncated to 128 bits) with the serving service's key, set
for each call by the kit's server (:class:`PageTokenKeyHook`, a key derived from the
deployment's key ring, so every replica shares it): a client cannot forge or alter one, and a
token whose signature does not match is ``INVALID_PAGE_TOKEN``. The values a token carries are
also type-checked when it is read.

Filters are conjunctions: ``field OP value [AND field OP value ...]`` with OP one of
``= != < <= > >=``; values are bare words or double-quoted strings; a trailing ``*`` on a
string value (with ``=``) matches a prefix where the field allows it.
"""

from __future__ import annotations

import base64
import calendar
import contextvars
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from corral.libs.errors import InvalidArgument, Validator

T = TypeVar("T")
OPERATORS = ("<=", ">=", "!=", "=", "<", ">")
_TOKEN = re.compile(
    r'\s*(?:(AND)\b|([A-Za-z_][A-Za-z0-9_.]*)|(<=|>=|!=|=|<|>)|"((?:[^"\\]|\\.)*)"|(\S+))'
)


@dataclass(frozen=True)
class FieldSpec:
    column: str
    convert: Callable[[str], Any] = str
    prefix: bool = False


@dataclass(frozen=True)
class Condition:
    column: str
    op: str
    value: Any
    prefix: bool = False


def parse_time(text: str) -> float:
    """RFC 3339 (``2025-06-01T00:00:00Z``) to epoch seconds."""
    try:
        base, _, frac = text.rstrip("Z").partition(".")
        parsed = time.strptime(base, "%Y-%m-%dT%H:%M:%S")
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an RFC 3339 UTC time") from exc
    return calendar.timegm(parsed) + (float(f"0.{frac}") if frac else 0.0)


def parse_datetime(text: str) -> datetime:
    """RFC 3339 (``2025-06-01T00:00:00Z``) to an aware UTC datetime (a filter's time value)."""
    return datetime.fromtimestamp(parse_time(text), UTC)


def enum_value(mapping: Mapping[str, str]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text.upper() not in mapping:
            raise ValueError(f"{text!r} is not one of {', '.join(mapping)}")
        return mapping[text.upper()]

    return convert


class LabelledFields(Mapping[str, FieldSpec]):
    """Filterable fields, plus any ``labels.<key>`` (matched in SQL by
    :func:`corral.libs.keyset.label_condition`)."""

    def __init__(self, fixed: Mapping[str, FieldSpec]) -> None:
        self._fixed = dict(fixed)

    def __getitem__(self, key: str) -> FieldSpec:
        if key.startswith("labels.") and len(key) > len("labels."):
            return FieldSpec(key)
        return self._fixed[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._fixed, "labels.<key>"])

    def __len__(self) -> int:
        return len(self._fixed) + 1


def _lex(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"cannot read the filter at {text[position:]!r}")
        position = match.end()
        and_, ident, op, quoted, bare = match.groups()
        if and_:
            tokens.append(("and", and_))
        elif ident is not None:
            tokens.append(("word", ident))
        elif op:
            tokens.append(("op", op))
        elif quoted is not None:
            tokens.append(("string", quoted.replace('\\"', '"')))
        else:
            tokens.append(("word", bare))
    return tokens


def parse_filter(text: str, fields: Mapping[str, FieldSpec]) -> list[Condition]:
    if not text.strip():
        return []
    try:
        tokens = _lex(text)
        conditions: list[Condition] = []
        index = 0
        while True:
            if index + 3 > len(tokens):
                raise ValueError("expected `field OP value`")
            (kind_f, name), (kind_o, op), (kind_v, raw) = tokens[index : index + 3]
            if kind_f != "word" or kind_o != "op" or kind_v not in ("word", "string"):
                raise ValueError("expected `field OP value`")
            spec = fields.get(name)
            if spec is None:
                raise ValueError(f"unknown field {name!r}; filterable: {', '.join(fields)}")
            prefix = spec.prefix and op == "=" and raw.endswith("*")
            value = spec.convert(raw[:-1] if prefix else raw)
            conditions.append(Condition(spec.column, op, value, prefix))
            index += 3
            if index == len(tokens):
                return conditions
            if tokens[index][0] != "and":
                raise ValueError("conditions must be joined with AND")
            index += 1
    except ValueError as exc:
        raise InvalidArgument(
            f"the filter is malformed: {exc}", reason="INVALID_FILTER", violations=()
        ) from exc


def parse_order(text: str, allowed: Mapping[str, str], default: str) -> tuple[str, bool]:
    """``field [desc]`` -> (column, descending)."""
    words = text.split() or default.split()
    if (
        len(words) > 2
        or words[0] not in allowed
        or (len(words) == 2 and words[1] not in ("desc", "asc"))
    ):
        check = Validator()
        check.add("order_by", f"must be one of {', '.join(allowed)}, optionally followed by desc")
        check.raise_if_any()
    return allowed[words[0]], len(words) == 2 and words[1] == "desc"


@dataclass(frozen=True)
class Page:
    """Where a page starts: after the row with ``(sort value, id)``, for one exact query."""

    size: int
    after: tuple[Any, Any] | None
    fingerprint: str


MAX_PAGE_SIZE = 1000


def fingerprint(*parts: object) -> str:
    """Binds a page token to its query: the caller, the filter, the order, the parent."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


# Without a configured key (a service that has no key ring), tokens are signed with a key of
# this process's own: still unforgeable, valid on this replica only.
_PROCESS_KEY = secrets.token_bytes(32)
_token_key: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "page_token_key", default=None
)


class PageTokenKeyHook:
    """A server hook: every call it admits signs and checks page tokens with ``key``."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    async def before(self, call: object) -> None:
        _token_key.set(self._key)


def _signature(body: bytes) -> bytes:
    return hmac.new(_token_key.get() or _PROCESS_KEY, body, hashlib.sha256).digest()[:16]


_SCALARS = (str, int, float, bool, type(None))


def _encode(value: Any) -> Any:
    return {"dt": value.isoformat()} if isinstance(value, datetime) else value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("dt"), str):
        return datetime.fromisoformat(value["dt"])
    if not isinstance(value, _SCALARS):
        raise ValueError("a page token value must be a scalar or a time")
    return value


def page_from(size: int, token: str, query_fingerprint: str, *, default: int = 50) -> Page:
    """The page a List request asks for: the size clamped to 1-1000 (0 means ``default``),
    and the position its ``page_token`` names, which must come from the same query."""
    check = Validator()
    check.check(size >= 0, "page_size", "must not be negative")
    check.raise_if_any()
    size = default if size == 0 else min(size, MAX_PAGE_SIZE)
    if not token:
        return Page(size, None, query_fingerprint)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body, signature = raw[:-16], raw[-16:]
        if len(raw) <= 16 or not hmac.compare_digest(signature, _signature(body)):
            raise ValueError("the page token's signature does not match")
        data = json.loads(body)
        after = (_decode(data["v"]), _decode(data["i"]))
        same = data["f"] == query_fingerprint
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            "the page_token is malformed", reason="INVALID_PAGE_TOKEN", violations=()
        ) from exc
    if not same:
        raise InvalidArgument(
            "the page_token belongs to a different query", reason="INVALID_PAGE_TOKEN"
        )
    return Page(size, after, query_fingerprint)


@dataclass(frozen=True)
class ListQuery:
    """What a List request asks for: its filter's conditions, its order and its page."""

    conditions: list[Condition]
    order: str
    descending: bool
    page: Page


def list_query(
    request: Any,
    fields: Mapping[str, FieldSpec],
    orders: Mapping[str, str],
    *scope: object,
    default_order: str = "create_time desc",
    default_size: int = 50,
) -> ListQuery:
    """The filter, ``order_by`` and page of a standard List ``request`` (``filter``,
    ``order_by``, ``page_size``, ``page_token``); its page tokens belong to this query: the
    ``scope`` (e.g. the caller, the parent), the filter and the order."""
    conditions = parse_filter(request.filter, fields)
    order, descending = parse_order(request.order_by, orders, default_order)
    page = page_from(
        request.page_size,
        request.page_token,
        fingerprint(*scope, request.filter, request.order_by),
        default=default_size,
    )
    return ListQuery(conditions, order, descending, page)


class Keyed(Protocol):
    @property
    def id(self) -> str: ...


K = TypeVar("K", bound=Keyed)


def page_of(rows: Sequence[K], query: ListQuery) -> tuple[list[K], str]:
    """:func:`finish_page` for rows fetched for ``query`` (with one to spare), each keyed by
    its ``query.order`` attribute and its id."""
    return finish_page(rows, query.page, lambda row: (getattr(row, query.order), row.id))


def next_token(page: Page, last: tuple[Any, Any] | None) -> str:
    if last is None:
        return ""
    body = json.dumps({"v": _encode(last[0]), "i": last[1], "f": page.fingerprint}).encode()
    return base64.urlsafe_b64encode(body + _signature(body)).decode().rstrip("=")


def finish_page(
    rows: Sequence[T], page: Page, key: Callable[[T], tuple[Any, Any]]
) -> tuple[list[T], str]:
    """The tail of every keyset query: ``rows`` were fetched with ``page.size + 1`` as limit;
    keep ``page.size`` of them and, when there was one more, the token of the next page
    (``key`` gives a row's ``(sort value, id)``)."""
    kept = list(rows[: page.size])
    if len(rows) <= page.size or not kept:
        return kept, ""
    return kept, next_token(page, key(kept[-1]))
