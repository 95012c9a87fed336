"""dynsparse: dynamic and static sparsity for PyTorch models.

The public API is small: gates (what decides), ``sparsify_`` (put gates into a model), ``named_gates``,
``fix_gates_``, ``penalty`` and ``sparsity_report``. Gated timm layers live in `dynsparse.layers`
(importing it imports timm; ``import dynsparse`` does not).
"""

from . import importance, prune, regularizers  # regularizers registers the "variational" gate
from .convert import SlicePlan, ZeroBranch, apply_plan, convert, load, load_gated, make_plan, save, save_gated, verify
from .convert.uniform import uniform_gates_
from .errors import ConfigError, DynsparseError, GateError, UnsupportedModuleError
from .gate_ops import fix_gates_, named_gates, penalty
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
from .gates.channel_gates import CHANNEL_GATES, FBSGate
from .gates.head_gates import HEAD_GATES, DejaVuHeadGate
from .gates.neuron_gates import NEURON_GATES, CatsGate, DejaVuGate, NeuronGate
from .gates.routers import ROUTERS, BlockRouter
from .gates.tokens import TOKEN_GATES, ThresholdTokenGate, TokenGate
from .knob import budget, get_budget, set_budget_
from .report import SparsityReport, sparsity_report
from .sparsify import DIMENSIONS, SparsifyPlan, plan_sparsify, sparsify_

__version__ = "0.1.0"

#: Public names whose modules import timm (or are heavy): imported on first access, so ``import dynsparse``
#: stays free of timm and transformers.
_LAZY = {
    "calibrate_tokens_": ".layers.token_setup",
    "calibrate_neurons_": ".layers.neuron_gating",
    "train_predictors_": ".layers.neuron_gating",
    "train_head_predictors_": ".layers.head_gating",
    "load_pretrained": ".pretrained",
}

__all__ = [
    "CHANNEL_GATES",
    "DIMENSIONS",
    "GATES",
    "HEAD_GATES",
    "NEURON_GATES",
    "ROUTERS",
    "TOKEN_GATES",
    "BlockRouter",
    "CatsGate",
    "ConfigError",
    "DejaVuGate",
    "DejaVuHeadGate",
    "DynsparseError",
    "FBSGate",
    "FixedGate",
    "Gate",
    "GateError",
    "HardConcreteGate",
    "InputDependentGate",
    "NeuronGate",
    "SigmoidGate",
    "SlicePlan",
    "SparsifyPlan",
    "SparsityReport",
    "ThresholdTokenGate",
    "TokenGate",
    "TopKGate",
    "UnsupportedModuleError",
    "ZeroBranch",
    "__version__",
    "apply_plan",
    "budget",
    "calibrate_neurons_",
    "calibrate_tokens_",
    "convert",
    "fix_gates_",
    "get_budget",
    "importance",
    "load",
    "load_gated",
    "load_pretrained",
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
    "train_head_predictors_",
    "train_predictors_",
    "uniform_gates_",
    "verify",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
