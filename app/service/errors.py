"""Errors the service layer raises; the API turns each into a problem+json answer with its status."""


class ServiceError(Exception):
    """A request the service refuses, with the HTTP status and title that describe why."""

    status: int = 400
    title: str = "Bad Request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFoundError(ServiceError):
    """The resource, or a parent it needs, does not exist."""

    status = 404
    title = "Not Found"


class ConflictError(ServiceError):
    """The request contradicts the resource's current state."""

    status = 409
    title = "Conflict"


class LeaseLostError(Exception):
    """The worker's lease on a job (or claim on orphans) was taken over: it must stop and write nothing."""
