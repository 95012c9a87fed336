"""Regularizers: penalties that push units or weights to zero, and the keep masks they lead to.

Every structured one ends in the gates (``keep_masks()`` feeds `dynsparse.fix_gates_`, or it is a gate's own
penalty); the per-weight sparse variational dropout layers are unstructured compression.

* `GroupLasso`: SSL group lasso over the producer weights of each gated unit, with a proximal step.
* `BNScaleL1`: network slimming, L1 on BatchNorm scales and a global percentile cut.
* `ExpectedL0`: the summed expected L0 of the hard-concrete gates.
* `LinearSVDO`, `Conv2dSVDO`, `sparse_vd_`, ...: sparse variational dropout per weight.
* `VariationalGate`: variational dropout per unit, registered as the gate ``"variational"``
  (importing this package registers it).
"""

from __future__ import annotations

from .bn_l1 import BNScaleL1
from .group_lasso import GroupLasso
from .l0 import ExpectedL0
from .variational import (
    Conv2dSVDO,
    LinearSVDO,
    SVDSparsity,
    VariationalGate,
    kl_approx,
    kl_weight,
    remove_svd_,
    sparse_vd_,
    svd_kl,
    svd_masks,
    svd_sparsity,
)

# budget.py (target-sparsity controller) is exported by its author

__all__ = [
    "BNScaleL1",
    "Conv2dSVDO",
    "ExpectedL0",
    "GroupLasso",
    "LinearSVDO",
    "SVDSparsity",
    "VariationalGate",
    "kl_approx",
    "kl_weight",
    "remove_svd_",
    "sparse_vd_",
    "svd_kl",
    "svd_masks",
    "svd_sparsity",
]
