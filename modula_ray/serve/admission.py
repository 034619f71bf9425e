"""What a replica admits, and the request errors found past the body's schema.

``Admission``: the slots a request's rows hold in one replica, taken in one step with the capacity
check (``CompositionServer._admit``) and given back once, however the request ends.
"""
from starlette.exceptions import HTTPException

from .generation import GenerationRequest


class Admission:
    """Rows holding slots of one replica; ``release`` gives them back once (and stops live rows)."""

    def __init__(self, server, requests: list[GenerationRequest]):
        self.server, self.requests, self.released = server, requests, False
        server.in_flight += len(requests)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.server.in_flight -= len(self.requests)
            for request in self.requests:
                request.cancel()  # a finished row ignores it; a live one (timeout, client gone) stops


def in_vocabulary(ids: list[int], vocab: int, field: str) -> None:
    if ids and max(ids) >= vocab:
        raise HTTPException(422, f"{field}: token id {max(ids)} is outside the vocabulary of {vocab}")


def row_failed(result) -> HTTPException | None:
    """A row that failed inside the decoder (its own seed, sampling or text): a 500 for its request alone."""
    if result is not None and result.finish_reason == "error":
        return HTTPException(500, f"decoding this request failed ({result.error}); the others in its batch were "
                                  "answered and the replica serves on")
    return None
