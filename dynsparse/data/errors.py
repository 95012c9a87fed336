"""Errors of the data package. Each names the file, directory or field it is about."""

from __future__ import annotations

from ..errors import DynsparseError

__all__ = ["DataError", "DataFormatError", "DataNotFoundError"]


class DataError(DynsparseError):
    """Base class of the errors raised while finding or reading a dataset."""


class DataFormatError(DataError, ValueError):
    """A data file is malformed (bad magic number, truncated, wrong sizes); the message names the file."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset's files are missing; the message names where they were looked for and how to get them."""
