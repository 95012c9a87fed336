"""pytest at the repository root: the docstring examples of ``dynsparse/`` run with the tests (``--doctest-modules``
in pyproject.toml). Modules that import an optional dependency at the top are left out where it is missing, as the
tests that need it skip."""

from __future__ import annotations

import importlib.util

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("transformers") is None:  # the 'hf' extra
    collect_ignore_glob += ["dynsparse/integrations/hf*.py", "dynsparse/layers/hf_*.py"]
