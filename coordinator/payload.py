"""A download lease's body from JSON array fragments (pure logic, no database).

The ingest writes each pending chunk's candidates' fields as JSON array fragments: the
elements of the array without its brackets, in the order of the chunk's ids
(``pending_chunks.url_j`` and the others; ``chunk_fragments`` builds them). A lease's
claim statements hand back the fragments of the chunks they took, already joined in the
order of each chunk's first id; the candidates that came without fragments (retries,
chunks written before the fragments existed) come from one read of their ``candidates``
rows, in id order. ``lease_body`` joins these parts into the body of
``pairfarm.protocol.CandidateColumns``: element i of every array belongs to the same
candidate because every part lists its elements in the same order in each field.

JSON strings cannot hold a raw control character and a fragment is joined only at its
ends, so a caption's commas or quotes never split an element.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the body's arrays, in CandidateColumns order (``attempt`` last)
FIELDS = ("id", "url", "caption", "language", "extra")


@dataclass(frozen=True)
class Part:
    """``count`` candidates as fragments of each field; ``attempt_j`` None: all first
    attempts."""

    count: int
    id_j: str
    url_j: str
    caption_j: str
    language_j: str
    extra_j: str
    attempt_j: str | None = None

    def fragments(self) -> tuple[str, ...]:
        return (self.id_j, self.url_j, self.caption_j, self.language_j, self.extra_j,
                self.attempt_j if self.attempt_j is not None else _ones(self.count))


def _ones(count: int) -> str:
    return ",".join(["1"] * count)


def lease_body(parts: list[Part]) -> str:
    """The ``CandidateColumns`` JSON of ``parts``, in their order; empty parts skipped."""
    kept = [p.fragments() for p in parts if p.count > 0]
    names = (*FIELDS, "attempt")
    arrays = [f'"{name}":[' + ",".join(p[i] for p in kept) + "]"
              for i, name in enumerate(names)]
    return "{" + ",".join(arrays) + "}"


def members_text(parts: list[Part]) -> str:
    """The ids of ``parts`` in body order as PostgreSQL array text (``{1,2,...}``): the
    batch's ``batch_members``, so that a re-lease keeps every candidate's key."""
    return "{" + ",".join(p.id_j for p in parts if p.count > 0) + "}"


def attempts_text(parts: list[Part]) -> str | None:
    """The attempts of ``parts`` in body order as PostgreSQL array text, element for
    element with ``members_text``; None when all are first attempts."""
    if all(p.attempt_j is None for p in parts):
        return None
    return "{" + ",".join(p.fragments()[-1] for p in parts if p.count > 0) + "}"


def count_of(parts: list[Part]) -> int:
    return sum(p.count for p in parts)
