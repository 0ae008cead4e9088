"""User-facing errors.

Every error a user can hit is a :class:`LoraplaceError`: a one-line cause plus what to do. The CLI prints it
without a traceback (``--debug`` shows one). :class:`ConfigError` carries *all* problems found in one
validation pass (litgpt's ``validate_args`` style), so a user fixes a spec in one round trip.
"""

from __future__ import annotations


class LoraplaceError(Exception):
    """An error with a cause (the message) and an optional hint saying what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class ConfigError(LoraplaceError):
    """One or more problems in a user's spec; ``problems`` lists every one."""

    def __init__(self, problems: list[str], context: str = "invalid configuration", hint: str | None = None):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{context} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n{lines}",
                         hint)


class ModelError(LoraplaceError):
    """A model reference that cannot be resolved or loaded."""


class PlacementError(LoraplaceError):
    """A placement that does not resolve to an exact, non-empty set of modules."""


class DataError(LoraplaceError):
    """A data source that is missing, malformed or empty after the guards."""


class TrialFailed(LoraplaceError):
    """A trial stopped before completion (non-finite loss, exception inside training)."""

    def __init__(self, message: str, step: int | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.step = step
