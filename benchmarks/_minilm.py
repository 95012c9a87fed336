"""Helpers of ``minilm_compress.py``: tokenized batches, the distillation loss, embeddings, the linear probe, the
structure summary (all from the library's sentence-embedding recipe, ``dynsparse.recipes.text*``), the
magnitude / Torch-Pruning baselines, and the FLOPs attribution of the recorded runs (`attribute_bert_flops_`)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import dynsparse as ds
from dynsparse.flops import CostModel, _exclusive, module_flops
from dynsparse.recipes.text_data import BatchStream, collate, tokenize
from dynsparse.recipes.text_distill import distill_loss, expand, layer_loss, layer_states, no_dropout_, width_keep
from dynsparse.recipes.text_distill import hidden_states as _hidden
from dynsparse.recipes.text_eval import encode, probe, structure

__all__ = [
    "_hidden",
    "attribute_bert_flops_",
    "batches",
    "collate",
    "distill_loss",
    "encode",
    "expand",
    "layer_loss",
    "layer_states",
    "magnitude_sparsity",
    "no_dropout_",
    "probe",
    "structure",
    "tokenize",
    "torch_pruning_",
    "width_keep",
]


def batches(seqs: Sequence[Sequence[int]], batch_size: int, seed: int = 0) -> BatchStream:
    """Endless shuffled batches; within chunks of 50 batches, sentences of similar length are batched together."""
    return BatchStream(seqs, batch_size, seed=seed)


def torch_pruning_(model: nn.Module, sparsity: float, example: tuple[Tensor, Tensor]) -> nn.Module:
    """Torch-Pruning (MetaPruner, L2 magnitude of each coupled group): heads and FFN neurons, width untouched.

    The residual stream is kept by ignoring every layer that writes it; Torch-Pruning leaves the head counts of
    ``BertSelfAttention`` stale, so they are written back by hand, as its own BERT example does.
    """
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    attn = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    heads = {lin: a.num_attention_heads for a in attn for lin in (a.query, a.key, a.value)}
    ignored = [model.embeddings]
    ignored += [layer.attention.output.dense for layer in model.encoder.layer]
    ignored += [layer.output.dense for layer in model.encoder.layer]
    pruner = tp.pruner.MetaPruner(
        model,
        {"input_ids": example[0], "attention_mask": example[1]},
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=sparsity,
        ignored_layers=ignored,
        output_transform=lambda out: out.last_hidden_state.sum(),
        num_heads=heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=sparsity,
    )
    pruner.step()
    for a in attn:
        a.num_attention_heads = pruner.num_heads[a.query]
        a.attention_head_size = a.query.out_features // a.num_attention_heads
        a.all_head_size = a.query.out_features
    return model.eval()


def magnitude_sparsity(teacher: nn.Module, kept: float) -> float:
    """Fraction of heads and neurons to remove by magnitude so the kept FLOPs are about ``kept``."""
    heads = teacher.config.num_attention_heads
    return 1.0 - max(1, round(kept * heads)) / heads


def magnitude_pruned(model: nn.Module, sparsity: float, verify_inputs=None) -> nn.Module:
    """The magnitude baseline: ``sparsity`` of the heads and of the FFN neurons of every layer removed by weight
    magnitude (``ds.prune.structured_``), converted (checked on ``verify_inputs`` when given). ``model`` is gated in
    place; the converted model is returned."""
    ds.prune.structured_(model, {"heads": sparsity, "neurons": sparsity}, importance="magnitude")
    return ds.convert(model, verify_inputs=verify_inputs)


def forward_step(model: nn.Module, ids: Tensor, mask: Tensor):
    """A no-argument step that runs ``model`` once on ``(ids, mask)`` under inference mode (for the timers)."""

    def run() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    return run


def attribute_bert_flops_(cost: CostModel, model: nn.Module, example: tuple[Tensor, Tensor]) -> CostModel:
    """Re-attribute the FLOPs of a gated HF BERT to every gate that scales them (in place; returns ``cost``).

    The attribution of the recorded runs (docs/results_minilm.md), from before the library's `CostModel` exempted
    the attention kernel from the width gate; it now gives the same terms as `CostModel`
    (``tests/test_minilm_compress.py``), which the script uses (``make_budget``).

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
    own = _exclusive(totals)  # totals are inclusive: each module minus its nearest counted descendants
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
