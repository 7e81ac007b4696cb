"""Exceptions whose message is meant for the person running the workflow.

Every error a user can cause (bad archive, bad config, missing weights) is raised as an
``AllfuseError`` subclass carrying a message that names the offending file or key and what to do.
The CLI and the workflow adapters print that message on one line and exit non-zero, instead of a
traceback.
"""

from __future__ import annotations


class AllfuseError(Exception):
    """Base class: an error with an actionable, user-facing message."""


class ConfigError(AllfuseError):
    """The configuration is invalid (unknown key, wrong type, bad range)."""


class DataError(AllfuseError):
    """Input data is unusable. ``problems`` lists every offending entry, not only the first."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{message}\n{listed}"
        super().__init__(message)


class WeightsError(AllfuseError):
    """Pretrained backbone weights are missing or cannot be loaded."""


class TrackingError(AllfuseError):
    """The MLflow tracking store cannot be reached, or refuses the job's credentials."""
