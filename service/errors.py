"""What can go wrong with a computation, as the HTTP layer answers it (see backend.py's failure model)."""

from __future__ import annotations

# Why a request is answered 503: the `reason` of the JSON error and the label of
# compute_api_rejected_requests_total. A closed set, so every series exists (at 0) from the first
# scrape and a dashboard or alert never confuses "no 503s yet" with "no data".
REASONS = ("overloaded", "no_workers", "scheduler_unreachable", "scheduler_lost", "shutting_down")


class Unavailable(Exception):
    """The cluster cannot take this request now: 503 with Retry-After."""

    def __init__(self, reason: str, detail: str, retry_after: int) -> None:
        if reason not in REASONS:
            raise ValueError(f"undeclared 503 reason {reason!r}: add it to errors.REASONS")
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
