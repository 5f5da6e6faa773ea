"""List requests, one way for every List method: what the client sent (:class:`ListRequest`),
what a method accepts (:class:`ListSpec`), and the parsed query its repository runs
(:class:`ListQuery`): the shared kit's filter grammar, ordering and keyset page tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from corral.libs import listing
from corral.libs.listing import Condition, FieldSpec, Page


@dataclass(frozen=True)
class ListRequest:
    """A List request's paging, filter and order, as the client sent them."""

    page_size: int = 0
    page_token: str = ""
    filter: str = ""
    order_by: str = ""


@dataclass(frozen=True)
class ListQuery:
    conditions: list[Condition]
    sort: str  # the column
    descending: bool
    page: Page


@dataclass(frozen=True)
class ListSpec:
    """What one List method accepts: its filterable fields and its orderings."""

    fields: Mapping[str, FieldSpec]
    orders: Mapping[str, str]  # order_by field -> column
    default_order: str
    default_size: int = 50

    def query(self, request: ListRequest, *scope: object) -> ListQuery:
        """The parsed query; ``scope`` (the caller, the parent) binds its page tokens to it,
        with the filter and the order."""
        conditions = listing.parse_filter(request.filter, self.fields)
        sort, descending = listing.parse_order(request.order_by, self.orders, self.default_order)
        bound = listing.fingerprint(*scope, request.filter, request.order_by)
        page = listing.page_from(
            request.page_size, request.page_token, bound, default=self.default_size
        )
        return ListQuery(conditions, sort, descending, page)
