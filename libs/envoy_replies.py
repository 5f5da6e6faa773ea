"""Envoy's own refusals in the API's error model, for the edge's ``local_reply_config``.

Envoy answers some calls itself: no or a bad token (jwt_authn), no route, no healthy upstream,
a transcoding error. Without this, REST callers would get plain text and gRPC callers a status
with no ``ErrorInfo``. With it, REST callers get a ``google.rpc.Status`` JSON body (``code``,
``message``, ``details`` with an ``ErrorInfo``: reason and domain ``corral.dev``), gRPC and
grpc-web callers a ``grpc-status-details-bin`` trailer, exactly as when a service refuses.
"""

from __future__ import annotations

import base64
from typing import Any

from google.rpc import error_details_pb2, status_pb2

from corral.libs.errors import ERROR_DOMAIN as DOMAIN

# Envoy's own refusals (no token, no route, no healthy upstream, ...) in the API's error model:
# REST callers get a google.rpc.Status JSON body with an ErrorInfo, gRPC and grpc-web callers a
# grpc-status-details-bin trailer. (HTTP status of Envoy's reply, gRPC code of the JSON body,
# ErrorInfo reason, message.) The first matching entry wins; %...% are Envoy's format commands.
_MISSING_TOKEN = {"header_filter": {"header": {"name": "authorization", "present_match": False}}}
_NOT_BEARER = {
    "header_filter": {
        "header": {
            "name": "authorization",
            "string_match": {"prefix": "Bearer ", "ignore_case": True},
            "invert_match": True,
        }
    }
}
_MALFORMED = "the authorization header must be 'Bearer <token>'"
_REST_REPLIES: tuple[tuple[int, dict[str, Any] | None, int, str, str], ...] = (
    (401, _MISSING_TOKEN, 16, "TOKEN_MISSING", "this call needs 'authorization: Bearer <token>'"),
    (401, _NOT_BEARER, 16, "TOKEN_MALFORMED", _MALFORMED),
    (401, None, 16, "TOKEN_INVALID", "the bearer token was refused: %LOCAL_REPLY_BODY%"),
    (403, None, 7, "PERMISSION_DENIED", "%LOCAL_REPLY_BODY%"),
    (404, None, 5, "NOT_FOUND", "no such route: %REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    (400, None, 3, "INVALID_ARGUMENT", "%LOCAL_REPLY_BODY%"),
    (413, None, 8, "RESOURCE_EXHAUSTED", "the request body is too large"),
    (429, None, 8, "RATE_LIMITED", "%LOCAL_REPLY_BODY%"),
    (503, None, 14, "UNAVAILABLE", "%LOCAL_REPLY_BODY%: retry with backoff"),
    (504, None, 4, "DEADLINE_EXCEEDED", "%LOCAL_REPLY_BODY%"),
)
# gRPC: Envoy maps the HTTP status to the grpc-status (401 UNAUTHENTICATED, 404 UNIMPLEMENTED,
# 503 UNAVAILABLE); the details trailer says the same with a reason.
_GRPC_REPLIES: tuple[tuple[int, dict[str, Any] | None, int, str, str], ...] = (
    (401, _MISSING_TOKEN, 16, "TOKEN_MISSING", "this call needs 'authorization: Bearer <token>'"),
    (401, _NOT_BEARER, 16, "TOKEN_MALFORMED", _MALFORMED),
    (401, None, 16, "TOKEN_INVALID", "the bearer token was refused"),
    (404, None, 12, "UNIMPLEMENTED", "the edge routes no such method"),
    (503, None, 14, "UNAVAILABLE", "no healthy upstream: retry with backoff"),
)


def _status_is(code: int) -> dict[str, Any]:
    value = {"default_value": code, "runtime_key": f"corral.local_reply.status_{code}"}
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}


def _grpc_request(grpc: bool) -> dict[str, Any]:
    """Matches requests of gRPC and grpc-web clients, or (``grpc=False``) of all others. A REST
    call the transcoder has turned into gRPC still counts as REST: it carries the original path
    the transcoder keeps."""
    content_type = {
        "name": "content-type",
        "string_match": {"prefix": "application/grpc"},
        "treat_missing_header_as_empty": True,  # a GET has none: not gRPC
    }
    transcoded = {"name": "x-envoy-original-path", "present_match": True}
    if grpc:
        return {
            "and_filter": {
                "filters": [
                    {"header_filter": {"header": content_type}},
                    {"header_filter": {"header": {**transcoded, "invert_match": True}}},
                ]
            }
        }
    return {
        "or_filter": {
            "filters": [
                {"header_filter": {"header": {**content_type, "invert_match": True}}},
                {"header_filter": {"header": transcoded}},
            ]
        }
    }


def _when(status: int, grpc: bool, extra: dict[str, Any] | None) -> dict[str, Any]:
    filters = [_status_is(status), _grpc_request(grpc), *([extra] if extra else [])]
    return {"and_filter": {"filters": filters}}


def _error_info(reason: str) -> dict[str, str]:
    return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": DOMAIN}


def _status_details(code: int, reason: str, message: str) -> str:
    """A google.rpc.Status with an ErrorInfo, as a grpc-status-details-bin value."""
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    return base64.b64encode(status.SerializeToString()).decode().rstrip("=")


def local_reply_config() -> dict[str, Any]:
    mappers: list[dict[str, Any]] = []
    for status, extra, code, reason, message in _GRPC_REPLIES:
        # The body becomes grpc-message, which must match the details' message (clients check).
        header = {"key": "grpc-status-details-bin", "value": _status_details(code, reason, message)}
        mappers.append(
            {
                "filter": _when(status, True, extra),
                "headers_to_add": [
                    {"header": header, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                ],
                "body_format_override": {"text_format_source": {"inline_string": message}},
            }
        )
    for status, extra, code, reason, message in _REST_REPLIES:
        body = {"code": code, "message": message, "details": [_error_info(reason)]}
        mappers.append(
            {
                "filter": _when(status, False, extra),
                "body_format_override": {"json_format": body, "content_type": "application/json"},
            }
        )
    # Any other refusal of Envoy's to a REST caller: the same shape, code UNKNOWN.
    other = {
        "status_code_filter": {
            "comparison": {
                "op": "GE",
                "value": {"default_value": 400, "runtime_key": "corral.local_reply.status_other"},
            }
        }
    }
    body = {"code": 2, "message": "%LOCAL_REPLY_BODY%", "details": [_error_info("ERROR")]}
    mappers.append(
        {
            "filter": {"and_filter": {"filters": [other, _grpc_request(False)]}},
            "body_format_override": {"json_format": body, "content_type": "application/json"},
        }
    )
    return {"mappers": mappers}
