"""What can go wrong with a computation, as the HTTP layer answers it (see backend.py's failure model)."""

from __future__ import annotations


class Unavailable(Exception):
    """The cluster cannot take this request now: 503 with Retry-After."""

    def __init__(self, reason: str, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class ComputeTimeout(Exception):
    """The computation did not finish within the request timeout: 504."""


class ComputeFailed(Exception):
    """The task raised, or killed every worker it ran on: 500."""


class Abandoned(Exception):
    """The request stopped waiting because its client went away (499 in the metrics)."""
