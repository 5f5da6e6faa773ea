"""Bearer-token verification shared by every service (each checks tokens itself)."""

from corral.libs.auth.caller import Caller, current_caller, require_caller
from corral.libs.auth.jwt import HttpJwksSource, JwksSource, StaticJwksSource, TokenVerifier

__all__ = [
    "Caller",
    "HttpJwksSource",
    "JwksSource",
    "StaticJwksSource",
    "TokenVerifier",
    "current_caller",
    "require_caller",
]
