"""Distillation losses of a (gated or converted) sentence encoder against the dense one.

The loss of the sentence-embedding recipe (and of ``benchmarks/minilm_compress.py``, which imports it):
``(1 - cos(mean-pooled student, teacher embedding)) + w_tok * (1 - mean token cosine of the last hidden states)``
plus, with ``w_layer``, CoFi's layer-wise term (mean over layers but the last of ``1 - token cosine`` to the
teacher's hidden states of the same layer). A converted model whose residual width was pruned returns fewer
channels; `expand` puts them back at their positions (zeros elsewhere), which is what the gated model outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import module_device
from ..pretrained import mean_pool

__all__ = [
    "distill_loss",
    "distillation_loss",
    "expand",
    "hidden_states",
    "layer_loss",
    "layer_states",
    "no_dropout_",
    "width_keep",
]


def expand(hidden: Tensor, keep: Tensor | None, width: int) -> Tensor:
    """Put a narrower stream ``(..., len(keep))`` back at its channel positions: ``(..., width)``, zeros elsewhere."""
    if keep is None or hidden.shape[-1] == width:
        return hidden
    out = hidden.new_zeros(*hidden.shape[:-1], width)
    out[..., keep] = hidden
    return out


def distill_loss(student: Tensor, teacher: Tensor, mask: Tensor, w_tok: float) -> Tensor:
    """``1 - cos`` of the mean-pooled sentence embeddings + ``w_tok * (1 - mean token cosine)``.

    Args:
        student: ``(B, N, C)`` last hidden states.
        teacher: ``(B, N, C)``.
        mask: ``(B, N)`` attention mask (1 on real tokens).
        w_tok: Weight of the token-level term (0 leaves it out).
    """
    mask = mask.to(student.device)
    s_emb, t_emb = mean_pool(student, mask), mean_pool(teacher, mask)
    loss = 1.0 - F.cosine_similarity(s_emb, t_emb, dim=-1).mean()
    if w_tok:
        m = mask.to(student.dtype)
        tok = (F.cosine_similarity(student, teacher, dim=-1, eps=1e-6) * m).sum() / m.sum()
        loss = loss + w_tok * (1.0 - tok)
    return loss


def layer_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Mean over layers of ``1 - token cosine`` between matching layers' hidden states (CoFi-style layer distill).

    The last layer is left out (the final-state terms of `distill_loss` cover it): 0 for a one-layer encoder.
    """
    if len(student) < 2:
        return student[0].new_zeros(())
    m = mask.to(student[0].device, student[0].dtype)
    terms = [
        1.0 - (F.cosine_similarity(s, t, dim=-1, eps=1e-6) * m).sum() / m.sum()
        for s, t in zip(student[:-1], teacher[:-1], strict=True)
    ]
    return torch.stack(terms).mean()


def no_dropout_(model: nn.Module) -> nn.Module:
    """Set every ``nn.Dropout``'s ``p`` to 0 (in place; returns ``model``)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def hidden_states(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """The last hidden states ``(B, N, C)`` of a transformers encoder, on the model's device."""
    dev = module_device(model)
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state


def layer_states(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """Every layer's output hidden states (embeddings excluded), on the model's device."""
    dev = module_device(model)
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True)
    return tuple(out.hidden_states[1:])


def distillation_loss(
    teacher: nn.Module,
    student: nn.Module,
    ids: Tensor,
    mask: Tensor,
    *,
    keep: Tensor | None,
    w_tok: float,
    w_layer: float,
) -> Tensor:
    """The distillation loss of one batch: final states (`distill_loss`) + ``w_layer`` x `layer_loss`.

    Args:
        teacher: The dense encoder (run under ``no_grad``).
        student: The gated or converted encoder.
        ids: ``(B, N)`` token ids.
        mask: ``(B, N)`` attention mask.
        keep: The student's residual channels among the teacher's (a converted model with pruned width), or None.
        w_tok: Weight of the token cosine term of the last hidden states.
        w_layer: Weight of the layer-wise term (0: one forward pass per model, no hidden states of every layer).
    """
    width = teacher.config.hidden_size
    if not w_layer:
        with torch.no_grad():
            t = hidden_states(teacher, ids, mask)
        return distill_loss(expand(hidden_states(student, ids, mask), keep, width), t, mask, w_tok)
    with torch.no_grad():
        t = layer_states(teacher, ids, mask)
    s = [expand(h, keep, width) for h in layer_states(student, ids, mask)]
    return distill_loss(s[-1], t[-1], mask, w_tok) + w_layer * layer_loss(s, t, mask)


def width_keep(model: nn.Module) -> Tensor | None:
    """Kept residual channels (sorted indices) of a model with a ``width`` gate, or None."""
    slot = getattr(model, "width", None)
    return None if slot is None else slot.gate.keep_mask().nonzero().squeeze(1)
