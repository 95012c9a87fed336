"""Helpers of ``minilm_compress.py``: tokenized batches, the distillation loss, embeddings, the linear probe, the
structure summary (all from the library's sentence-embedding recipe, ``dynsparse.recipes.text*``), and the
magnitude / Torch-Pruning baselines."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dynsparse.recipes.text_data import BatchStream, collate, tokenize
from dynsparse.recipes.text_distill import distill_loss, expand, layer_loss, layer_states, no_dropout_, width_keep
from dynsparse.recipes.text_distill import hidden_states as _hidden
from dynsparse.recipes.text_eval import encode, probe, structure

__all__ = [
    "_hidden",
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
