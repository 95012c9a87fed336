"""FLOPs of a gated Hugging Face BERT, attributed to every gate that scales them.

`dynsparse.flops.CostModel` scopes each gate by its owner module. For a BERT with a ``width`` gate (the
residual stream) its scope is the whole model, so it also scales the attention kernel (q·k and attention·v,
the own FLOPs of ``attention.self``) with the width, although that kernel runs over the heads' channels and does
not shrink with the stream: with width pruned, `CostModel` under-counts the kept FLOPs (on a 3-layer test BERT:
0.40 predicted vs 0.43 counted on the converted model). `attribute_bert_flops_` (from
``benchmarks/minilm_compress.py``, whose recorded runs used it) attributes that kernel to the heads and
attention-branch gates only; its kept fraction equals the FLOPs counted by ``torch.utils.flop_counter`` on the
converted model (``tests/test_minilm_compress.py``, ``tests/test_recipe_text.py``). Without a width gate the two
agree exactly.
"""

from __future__ import annotations

import re
from collections import defaultdict

from torch import Tensor, nn

from ..flops import CostModel, module_flops

__all__ = ["attribute_bert_flops_"]


def attribute_bert_flops_(cost: CostModel, model: nn.Module, example: tuple[Tensor, Tensor]) -> CostModel:
    """Re-attribute the FLOPs of a gated HF BERT to every gate that scales them (in place; returns ``cost``).

    Per layer ``i``: everything under ``encoder.layer.i.attention`` scales with that layer's heads gate and
    attention-branch gate, and (except the q·k / attention·v kernel in ``attention.self``) with the width gate;
    everything under ``intermediate`` / ``output`` scales with the neurons gate, the FFN-branch gate and the width
    gate. Other modules (embeddings, a pooler) scale with the width gate. Kept cost = cost x product of the kept
    fractions of the gates that cover it, as in `CostModel`.

    Args:
        cost: A `CostModel` of ``model`` (its slots are kept, its terms replaced).
        model: The gated ``BertModel``.
        example: ``(input_ids, attention_mask)``, each ``(1, N)``, of the FLOPs count.
    """
    index = {fqn: i for i, (fqn, _) in enumerate(cost.slots)}
    width = index.get("width")
    totals = module_flops(model, example)
    own = dict(totals)
    for name, flops in totals.items():
        parent = name.rpartition(".")[0] if name else None
        while parent is not None and parent not in totals:  # a container never called (ModuleList) is missing
            parent = parent.rpartition(".")[0] if parent else None
        if parent is not None:  # totals are inclusive: subtract each module from its nearest counted ancestor
            own[parent] -= flops
    terms: dict[tuple[int, ...], float] = defaultdict(float)
    for name, flops in own.items():
        if not flops:
            continue
        key: set[int | None] = set()
        m = re.match(r"encoder\.layer\.(\d+)\.(attention|intermediate|output)(\.|$)", name)
        kernel = False
        if m:
            p = f"encoder.layer.{m[1]}"
            carrier = f"{p}.attention.output.dense" if m[2] == "attention" else f"{p}.output.dense"
            key |= {index.get(f"{carrier}.gate_in"), index.get(f"{carrier}.gate_out")}
            kernel = name == f"{p}.attention.self"
        if width is not None and not kernel:
            key.add(width)
        key.discard(None)
        terms[tuple(sorted(key))] += flops
    cost.total = float(sum(own.values()))
    cost.terms = sorted(terms.items())
    return cost
