"""Opt-out signals read from the response headers before the body.

``X-Robots-Tag``: a site opts its images out of dataset building with a directive from
``disallowed`` (img2dataset's ``--disallowed_header_directives`` default ``noai``,
``noimageai``, ``noindex``, ``noimageindex``, and ``noml`` here); ``none`` stands for
``noindex, nofollow`` and counts when either is disallowed. A directive may name the
agent it is for: ``X-Robots-Tag: pairfarm: noai`` applies to us,
``X-Robots-Tag: otherbot: noai`` does not; an agent prefix applies to the directives
that follow it in the same header value, up to the next prefix.

``tdm-reservation`` (W3C TDM Reservation Protocol): ``1`` reserves the rights of text
and data mining, ``0`` (or no header) does not.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

#: img2dataset's default ``--disallowed_header_directives``, and ``noml``
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex", "noml")

#: Directives that stand for others (``none`` is ``noindex, nofollow``).
_SHORTHANDS = {"none": frozenset({"noindex", "nofollow"})}

#: Directives that carry a value after a colon; their name is not a user-agent token.
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)


def opt_out_directive(values: Iterable[str], agent: str,
                      disallowed: Collection[str] = DEFAULT_DISALLOWED_DIRECTIVES
                      ) -> str | None:
    """The first directive of ``disallowed`` (or a shorthand for one) aimed at everyone
    or at ``agent``, or None."""
    ours = agent.lower()
    wanted = frozenset(d.lower() for d in disallowed)
    for value in values:
        found = _scan(value, ours, wanted)
        if found is not None:
            return found
    return None


def tdm_reserved(values: Iterable[str]) -> bool:
    """Whether a ``tdm-reservation`` header value reserves the rights (``1``)."""
    return any(value.strip() == "1" for value in values)


def _scan(value: str, agent: str, wanted: frozenset[str]) -> str | None:
    target: str | None = None
    for raw in value.split(","):
        target, directive = _split_agent(raw.strip().lower(), target)
        if target in (None, agent) and _disallowed(directive, wanted):
            return directive
    return None


def _disallowed(directive: str, wanted: frozenset[str]) -> bool:
    return directive in wanted or bool(_SHORTHANDS.get(directive, frozenset()) & wanted)


def _split_agent(part: str, target: str | None) -> tuple[str | None, str]:
    """(agent the directive is for, directive) of one comma-separated part."""
    name, colon, rest = part.partition(":")
    if not colon or name.strip() in _VALUED_DIRECTIVES:
        return target, part
    return name.strip(), rest.strip()
