"""The ``X-Robots-Tag`` opt-out, read from the response headers before the body.

A site opts its images out of dataset building with ``noai``, ``noimageai``, ``noindex``
or ``noimageindex`` (and ``none``, which means ``noindex, nofollow``). A directive may
name the agent it is for: ``X-Robots-Tag: pairfarm: noai`` applies to us,
``X-Robots-Tag: otherbot: noai`` does not; an agent prefix applies to the directives
that follow it in the same header value, up to the next prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})

#: Directives that carry a value after a colon; their name is not a user-agent token.
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)


def opt_out_directive(values: Iterable[str], agent: str) -> str | None:
    """The first opt-out directive aimed at everyone or at ``agent``, or None."""
    ours = agent.lower()
    for value in values:
        found = _scan(value, ours)
        if found is not None:
            return found
    return None


def _scan(value: str, agent: str) -> str | None:
    target: str | None = None
    for raw in value.split(","):
        target, directive = _split_agent(raw.strip().lower(), target)
        if directive in OPT_OUT_DIRECTIVES and target in (None, agent):
            return directive
    return None


def _split_agent(part: str, target: str | None) -> tuple[str | None, str]:
    """(agent the directive is for, directive) of one comma-separated part."""
    name, colon, rest = part.partition(":")
    if not colon or name.strip() in _VALUED_DIRECTIVES:
        return target, part
    return name.strip(), rest.strip()
