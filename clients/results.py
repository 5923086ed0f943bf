"""What the client's calls return: typed classifications, and one result per image of a stream."""

from __future__ import annotations

from dataclasses import dataclass

from flotilla.api.v1 import inference_pb2
from flotilla.errors import FlotillaError


@dataclass(frozen=True)
class ClassScore:
    index: int
    """Class index in the model's output."""
    label: str
    score: float
    """Probability in [0, 1]."""


@dataclass(frozen=True)
class Classification:
    image_uuid: str
    model: str
    classes: list[ClassScore]
    """Best first."""
    request_id: str = ""


def classification_of(reply: inference_pb2.ClassifyResponse) -> Classification:
    return Classification(
        image_uuid=reply.image_uuid,
        model=reply.model_name,
        classes=[ClassScore(c.index, c.label, c.score) for c in reply.classes],
        request_id=reply.request_id,
    )


@dataclass(frozen=True)
class StreamResult:
    """One image's outcome in ``FlotillaClient.classify_many``: its classification or its error.

    Exactly one of ``classification`` and ``error`` is set. A failed image is
    a result, not an exception, so one bad image does not end the iteration.
    """

    index: int
    """The image's position in the items given to ``classify_many``."""
    image_uuid: str
    """The stored image's uuid ("" when a JPEG's upload failed)."""
    classification: Classification | None
    error: FlotillaError | None
    """Its status as a unary call would raise it (``error.code``, ``error.message``, ``error.origin``)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> Classification:
        """The classification; raises the image's error."""
        if self.error is not None:
            raise self.error
        assert self.classification is not None
        return self.classification
