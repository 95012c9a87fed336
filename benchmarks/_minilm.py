"""Helpers of ``minilm_compress.py``: tokenized batches, the distillation loss, embeddings, the linear probe, the
structure summary, and the magnitude / Torch-Pruning baselines."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynsparse.pretrained import mean_pool


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(seqs: Sequence[Sequence[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def batches(seqs: Sequence[Sequence[int]], batch_size: int, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled batches; within chunks of 50 batches, sentences of similar length are batched together."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(seqs)))
        rng.shuffle(order)
        chunk = 50 * batch_size
        groups = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: len(seqs[i]))
            groups += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
        rng.shuffle(groups)
        for g in groups:
            if len(g) == batch_size:
                yield collate([seqs[i] for i in g])


# ---------------------------------------------------------------------------------------------- distillation
def expand(hidden: Tensor, keep: Tensor | None, width: int) -> Tensor:
    """Put a narrower stream (a converted model with pruned width) back at its channel positions, zeros elsewhere."""
    if keep is None or hidden.shape[-1] == width:
        return hidden
    out = hidden.new_zeros(*hidden.shape[:-1], width)
    out[..., keep] = hidden
    return out


def distill_loss(student: Tensor, teacher: Tensor, mask: Tensor, w_tok: float) -> Tensor:
    """``1 - cos`` of the mean-pooled sentence embeddings + ``w_tok * (1 - mean token cosine)``."""
    mask = mask.to(student.device)
    s_emb, t_emb = mean_pool(student, mask), mean_pool(teacher, mask)
    loss = 1.0 - F.cosine_similarity(s_emb, t_emb, dim=-1).mean()
    if w_tok:
        m = mask.to(student.dtype)
        tok = (F.cosine_similarity(student, teacher, dim=-1, eps=1e-6) * m).sum() / m.sum()
        loss = loss + w_tok * (1.0 - tok)
    return loss


def no_dropout_(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _hidden(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    dev = _device(model)
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state


def layer_states(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """Every layer's output hidden states (embeddings excluded), on the model's device."""
    dev = _device(model)
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True)
    return tuple(out.hidden_states[1:])


def layer_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Mean over layers of ``1 - token cosine`` between matching layers' hidden states (CoFi-style layer distill).

    The last layer is left out (the final-state terms of `distill_loss` cover it).
    """
    m = mask.to(student[0].device, student[0].dtype)
    terms = [
        1.0 - (F.cosine_similarity(s, t, dim=-1, eps=1e-6) * m).sum() / m.sum()
        for s, t in zip(student[:-1], teacher[:-1], strict=True)
    ]
    return torch.stack(terms).mean()


def width_keep(model: nn.Module) -> Tensor | None:
    slot = getattr(model, "width", None)
    return None if slot is None else slot.gate.keep_mask().nonzero().squeeze(1)


def structure(small: nn.Module) -> list[str]:
    """Per layer of a converted BERT: heads, FFN neurons (or 'removed')."""
    out = []
    for i, layer in enumerate(small.encoder.layer):
        att = layer.attention.self
        heads = getattr(att, "num_attention_heads", None)
        dense = getattr(layer.intermediate, "dense", None)
        out.append(
            f"layer {i}: heads {heads if heads is not None else 'removed'}, "
            f"neurons {dense.out_features if dense is not None else 'removed'}"
        )
    return out


# ---------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def encode(model: nn.Module, seqs: Sequence[Sequence[int]], keep: Tensor | None, width: int, bs: int = 64) -> Tensor:
    """L2-normalized mean-pooled embeddings ``(N, width)`` (a pruned stream is put back at its channels)."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs), width)
    for b in range(0, len(order), bs):
        idx = order[b : b + bs]
        ids, mask = collate([seqs[i] for i in idx])
        h = expand(_hidden(model, ids, mask), keep, width)
        out[idx] = F.normalize(mean_pool(h, mask.to(h.device)), dim=-1).float().cpu()
    return out


def probe(train_x: Tensor, train_y: Sequence[int], test_x: Tensor, test_y: Sequence[int]) -> float:
    """Test accuracy (%) of a logistic-regression probe (C = 1, chosen by CV for the dense model, docs)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0, max_iter=5000).fit(train_x.numpy(), list(train_y))
    return 100.0 * float(clf.score(test_x.numpy(), list(test_y)))


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
