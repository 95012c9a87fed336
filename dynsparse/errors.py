"""Error types. Every error names what it is about: the module fqn and type, the field, or the file."""

from __future__ import annotations

__all__ = ["ConfigError", "DynsparseError", "GateError", "UnsupportedModuleError"]


class DynsparseError(Exception):
    """Base class of every error raised by dynsparse."""


class ConfigError(DynsparseError, ValueError):
    """A spec, option or field has a wrong value; the message names the field."""


class GateError(DynsparseError, ValueError):
    """A gate was built or used wrongly (bad size, bad mask); the message names the gate."""


class UnsupportedModuleError(DynsparseError, TypeError):
    """A module cannot be gated for a dimension; the message names its fqn and type.

    Attributes:
        fqn: Qualified name of the module inside the model.
        module_type: Name of the module's class.
        dimension: The dimension that was asked for.
        reason: Why it cannot be gated.
        action: What failed: ``"gate"`` (sparsify) or ``"convert"``.
    """

    def __init__(self, fqn: str, module_type: str, dimension: str, reason: str, action: str = "gate") -> None:
        self.fqn = fqn
        self.module_type = module_type
        self.dimension = dimension
        self.reason = reason
        self.action = action
        where = fqn or "<root>"
        super().__init__(f"cannot {action} {dimension!r} of module {where!r} ({module_type}): {reason}")

    def __reduce__(self) -> tuple:
        """Pickle and copy by the constructor's arguments (the default would call the class with the message only)."""
        return type(self), (self.fqn, self.module_type, self.dimension, self.reason, self.action)
