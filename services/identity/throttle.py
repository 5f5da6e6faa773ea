"""Login throttling: failed sign-ins per account and per source address in a sliding window.

The failures live in identity's database (``login_failures``), so every replica enforces the
same budget. The check and the count are not one atomic step: a burst of concurrent guesses can
overshoot a budget by at most the number of requests in flight. A successful sign-in clears the
account's failures (not the source's).
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.libs.errors import ResourceExhausted

ACCOUNT = "account"
SOURCE = "source"


@dataclass(frozen=True)
class LoginThrottle:
    max_per_account: int
    max_per_source: int
    window_seconds: float

    def limit(self, scope: str) -> int:
        return self.max_per_account if scope == ACCOUNT else self.max_per_source

    def check(self, scope: str, failures: int, oldest: float | None, now: float) -> None:
        """Raise RESOURCE_EXHAUSTED (LOGIN_THROTTLED, with RetryInfo) once a budget is spent.

        ``failures`` counts the failures inside the window; ``oldest`` is the first of them.
        """
        if failures < self.limit(scope) or oldest is None:
            return
        retry = max(oldest + self.window_seconds - now, 1.0)
        raise ResourceExhausted(
            "too many failed sign-ins; try again later",
            reason="LOGIN_THROTTLED",
            retry_after_seconds=round(retry, 3),
            metadata={"scope": scope},
        )
