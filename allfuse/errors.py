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


class IntermediateError(DataError):
    """A file an earlier rule of the workflow wrote is missing, cut short or not in its format.

    Whatever the reader found, the message is ONE line: the file, what is wrong with it, and how
    to make it again (the rule that writes it; ``snakemake --forcerun <file>`` reruns that job and
    everything downstream of it). Every reader of an intermediate says it this way, through
    ``allfuse.files.reading``; ``problems`` keeps every bad entry found, the message shows the first.
    """

    def __init__(self, path: object, made_by: str, problem: str, problems: list[str] | None = None) -> None:
        self.path, self.made_by = str(path), made_by
        text = " ".join(str(problem).split())  # one line, whatever the underlying error printed
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            text = f"{text}: {' '.join(str(problems[0]).split())}{more}"
        if problem == MISSING:
            remedy = f"it is written by rule {made_by} (run the workflow up to it)"
        else:
            remedy = f"delete it and rerun rule {made_by} (`snakemake --forcerun {path}` does both)"
        AllfuseError.__init__(self, f"{path}: {text}; {remedy}")
        self.problems = list(problems or [])


#: The problem text of an intermediate that does not exist (yet).
MISSING = "not found"


class WeightsError(AllfuseError):
    """Pretrained backbone weights are missing or cannot be loaded."""


class TrackingError(AllfuseError):
    """The MLflow tracking store cannot be reached, or refuses the job's credentials."""
