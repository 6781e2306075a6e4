"""Errors speedq raises on purpose. Each message is one sentence that names the fix.

The CLI turns any ``SpeedqError`` into a one-line ``error: ...`` and exit status 2; anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpeedqError(Exception):
    """Base of every expected, user-facing error."""


class UnknownNameError(SpeedqError, KeyError):
    """A model, method, scheme, family or benchmark name that nothing registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        listing = ", ".join(known) if known else "none"
        super().__init__(f"unknown {kind} {name!r}{hint}; registered: {listing}")
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class SchemeError(SpeedqError, ValueError):
    """A quantization scheme that cannot be used (bad bits, group size, shapes)."""


class RegistryError(SpeedqError):
    """registry.toml (or a plugin's contribution to it) is malformed."""


class PluginError(SpeedqError):
    """A plugin misbehaves: duplicate names, a hook that raises, a wrong return type."""


class WeightsNotFoundError(SpeedqError, FileNotFoundError):
    """Real weights were asked for but are not on disk."""


class CheckpointError(SpeedqError):
    """A saved artifact is corrupt, truncated or does not match its config."""


def suggest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or the empty string."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
