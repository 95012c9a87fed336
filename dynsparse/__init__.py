"""dynsparse: dynamic and static sparsity for PyTorch models.

The public API is small: gates (what decides), ``sparsify_`` (put gates into a model), ``named_gates``,
``fix_gates_``, ``penalty`` and ``sparsity_report``. Gated timm layers live in `dynsparse.layers`
(importing it imports timm; ``import dynsparse`` does not).
"""

from . import importance, prune, regularizers  # regularizers registers the "variational" gate
from .convert import SlicePlan, ZeroBranch, apply_plan, convert, load, load_gated, make_plan, save, save_gated, verify
from .errors import ConfigError, DynsparseError, GateError, UnsupportedModuleError
from .gates import (
    GATES,
    FixedGate,
    Gate,
    HardConcreteGate,
    InputDependentGate,
    SigmoidGate,
    TopKGate,
    make_gate,
    register_gate,
)
from .gates.routers import ROUTERS, BlockRouter
from .gates.tokens import TOKEN_GATES, TokenGate
from .knob import budget, get_budget, set_budget_
from .report import SparsityReport, sparsity_report
from .sparsify import DIMENSIONS, SparsifyPlan, fix_gates_, named_gates, penalty, plan_sparsify, sparsify_

__version__ = "0.1.0"

__all__ = [
    "DIMENSIONS",
    "GATES",
    "ROUTERS",
    "TOKEN_GATES",
    "BlockRouter",
    "ConfigError",
    "DynsparseError",
    "FixedGate",
    "Gate",
    "GateError",
    "HardConcreteGate",
    "InputDependentGate",
    "SigmoidGate",
    "SlicePlan",
    "SparsifyPlan",
    "SparsityReport",
    "TokenGate",
    "TopKGate",
    "UnsupportedModuleError",
    "ZeroBranch",
    "__version__",
    "apply_plan",
    "budget",
    "convert",
    "fix_gates_",
    "get_budget",
    "importance",
    "load",
    "load_gated",
    "make_gate",
    "make_plan",
    "named_gates",
    "penalty",
    "plan_sparsify",
    "prune",
    "register_gate",
    "regularizers",
    "save",
    "save_gated",
    "set_budget_",
    "sparsify_",
    "sparsity_report",
    "verify",
]
