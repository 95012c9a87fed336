"""Griffe extension used by the API reference: render the package's docstrings as their authors meant.

The docstrings use ``Example:`` (which griffe's Google parser does not know, so the doctest lines would render
as nested quotes) and a few Sphinx roles (``:class:`X```), which Markdown shows literally. This rewrites both
when griffe loads an object; the source files are not touched. Once the docstrings say ``Examples:`` and use
plain backticks, this file and its entry in ``mkdocs.yml`` can go.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`")


class DocstringSections(griffe.Extension):
    """Rename ``Example:`` sections to ``Examples:`` and drop Sphinx roles before the docstring is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is not None:
            doc.value = _ROLE.sub("`", _EXAMPLE.sub(r"\1Examples:", doc.value))
