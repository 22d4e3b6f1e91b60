"""What the SDK raises. Every message comes from Leash's own error answer or from the SDK; none
carries a token, a grant handle, a proof or a key."""

from __future__ import annotations

from typing import Any


class LeashError(Exception):
    """Leash refused something the SDK asked for itself (the token exchange, an approval's
    status, the task's completion): `code` is the contract's error code (API §0), e.g.
    `invalid_scope`, `invalid_client`, `rate_limited`."""

    def __init__(self, code: str, description: str = "", status: int | None = None) -> None:
        self.code = code
        self.description = description
        self.status = status
        super().__init__(f"{code}: {description}" if description else code)

    # Pickled with their own arguments (a worker process hands its error to the parent so).
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (LeashError, (self.code, self.description, self.status))


class TaskEnded(LeashError):
    """The task's grant is over (completed, revoked, expired or out of requests): no token will
    be issued for it again."""

    def __init__(self, description: str = "the task has ended", status: int | None = None) -> None:
        super().__init__("invalid_grant", description, status)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (TaskEnded, (self.description, self.status))


class ApprovalDenied(LeashError):
    """The human denied the request this approval was for."""

    def __init__(self, approval_id: str) -> None:
        self.approval_id = approval_id
        super().__init__("approval_denied", f"approval {approval_id} was denied")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (ApprovalDenied, (self.approval_id,))


class ApprovalTimeout(LeashError):
    """No decision within the task's `approval_timeout`, or the approval expired at Leash."""

    def __init__(self, approval_id: str, description: str) -> None:
        self.approval_id = approval_id
        super().__init__("approval_timeout", description)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (ApprovalTimeout, (self.approval_id, self.description))
