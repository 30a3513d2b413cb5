"""Errors a user can fix. The CLI prints them as one clear message, without a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's config, data or run directory, stated so they know what to change."""


class ConfigError(PipelineError):
    """The config names an unknown key, has a wrong type, or asks for something impossible."""


class DataError(PipelineError):
    """A dataset file is malformed. Always names the file, the line (1-based) and the field."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field = str(path), line, field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")
