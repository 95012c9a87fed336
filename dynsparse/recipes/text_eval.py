"""Evaluation of a compressed sentence encoder: embeddings, a linear probe, FLOPs and latency against the dense
encoder (`evaluate_text`), the structure, the printed report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..flops import count_flops
from ..pretrained import mean_pool
from .text_data import TextData, collate
from .text_distill import expand, hidden_states
from .text_schema import TextRecipe

__all__ = ["encode", "evaluate_text", "format_text_report", "probe", "structure"]


@torch.no_grad()
def encode(model: nn.Module, seqs: Sequence[Sequence[int]], keep: Tensor | None, width: int, bs: int = 64) -> Tensor:
    """L2-normalized mean-pooled embeddings ``(N, width)`` on the CPU, in float32, in the order of ``seqs``.

    The model runs in eval mode on its device, in batches of similar length; a pruned stream (``keep``: its
    channels among ``width``) is put back at its channel positions.
    """
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs), width)
    for b in range(0, len(order), bs):
        idx = order[b : b + bs]
        ids, mask = collate([seqs[i] for i in idx])
        h = expand(hidden_states(model, ids, mask), keep, width)
        out[idx] = F.normalize(mean_pool(h, mask.to(h.device)), dim=-1).float().cpu()
    return out


def probe(train_x: Tensor, train_y: Sequence[int], test_x: Tensor, test_y: Sequence[int], c: float = 1.0) -> float:
    """Test accuracy (%) of a scikit-learn logistic-regression probe (``C = c``) on embeddings ``(N, C)``."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=5000).fit(train_x.numpy(), list(train_y))
    return 100.0 * float(clf.score(test_x.numpy(), list(test_y)))


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


def format_text_report(r: dict[str, Any]) -> str:
    """A plain-text table of a sentence-embedding report (`dynsparse.recipes.text.run_text_recipe`)."""
    ev = r["evaluate"]
    lines = [f"recipe {r['recipe']} (sentence-embedding, {r['encoder']})", ""]
    lines.append("stage      steps  distill loss  kept FLOPs (gates)")
    for s in r["stages"]:
        kf = f"{100 * s['kept_flops']:.1f}%" if s.get("kept_flops") is not None else "-"
        loss = f"{s['loss']:.4f}" if s.get("loss") is not None else "-"
        lines.append(f"{s['stage']:<10} {s['steps']:>5}  {loss:>12}  {kf:>18}")
    lines.append("")
    lines.append(f"{'':<34}{'dense':>14}{'converted':>14}")
    p, f = r["params"], r["flops"]
    lines.append(f"{'parameters':<34}{p['dense']:>14,}{p['converted']:>14,}")
    lines.append(
        f"{'FLOPs (1 x ' + str(f['tokens']) + ' tokens)':<34}{f['dense']:>14,}{f['converted']:>14,}"
        f"   {100 * f['kept']:.1f}% kept (target {100 * r['target']:.1f}%)"
    )
    cos = ev["cosine"]
    lines.append(
        f"{'held-out cosine to dense (mean)':<34}{1.0:14.4f}{cos['mean']:14.4f}"
        f"   p10 {cos['p10']:.4f}, {cos['n']} {ev['held_out']} test sentences"
    )
    if ev.get("probe") is not None:
        pr = ev["probe"]
        lines.append(
            f"{'probe accuracy (' + pr['set'] + ')':<34}{pr['dense']:13.2f}%{pr['converted']:13.2f}%"
            f"   {pr['train']} train -> {pr['test']} test"
        )
    for lat in r.get("latency", []):
        lines.append(
            f"{'latency 1 x ' + str(f['tokens']) + ' (ms, CPU)':<34}{lat['dense_ms']:14.3f}{lat['converted_ms']:14.3f}"
            f"   x{lat['speedup']:.2f} ({lat['threads']} thread, median of {lat['rounds']} interleaved rounds)"
        )
    lines.append("")
    lines.append(f"width {r['width']} of {r['dense_width']}; " + "; ".join(r["structure"]))
    return "\n".join(lines)


def evaluate_text(
    recipe: TextRecipe,
    data: TextData,
    teacher: nn.Module,
    small: nn.Module,
    keep: Tensor | None,
    width: int,
    device: torch.device,
) -> dict[str, Any]:
    """The converted encoder against the dense one: the ``params``, ``flops``, ``evaluate`` and ``latency`` fields
    of a sentence-embedding report (`dynsparse.recipes.text.run_text_recipe`).

    Embeddings (held-out cosine, linear probe) are computed on ``device``, each model moved there and back to the
    CPU; FLOPs (of ``data.example``) and latency (``recipe.evaluate.latency``) on the CPU.

    Args:
        recipe: The recipe (its ``evaluate`` and ``budget.flops_tokens``).
        data: The recipe's tokenized text.
        teacher: The dense encoder, on the CPU.
        small: The converted encoder, on the CPU.
        keep: ``small``'s residual channels among the teacher's ``width`` (None: all).
        width: The dense encoder's hidden size.
        device: Where the embeddings are computed.
    """
    ev = recipe.evaluate
    emb, acc = {}, {}
    for name, m, k in (("dense", teacher, None), ("converted", small, keep)):
        m.to(device)
        emb[name] = encode(m, data.held, k, width, bs=ev.batch_size)
        if ev.probe is not None:
            acc[name] = probe(
                encode(m, data.probe_train, k, width, bs=ev.batch_size),
                data.probe_train_y,
                encode(m, data.probe_test, k, width, bs=ev.batch_size),
                data.probe_test_y,
                c=ev.probe_c,
            )
        m.cpu()
    cos = (emb["converted"] * emb["dense"]).sum(-1)
    ex = data.example
    dense_flops, small_flops = count_flops(teacher, *ex), count_flops(small, *ex)
    out: dict[str, Any] = {
        "params": {
            "dense": sum(p.numel() for p in teacher.parameters()),
            "converted": sum(p.numel() for p in small.parameters()),
        },
        "flops": {
            "tokens": recipe.budget.flops_tokens,
            "dense": dense_flops,
            "converted": small_flops,
            "kept": small_flops / dense_flops,
        },
        "evaluate": {
            "held_out": ev.held_out,
            "cosine": {"n": len(data.held), "mean": float(cos.mean()), "p10": float(cos.quantile(0.1))},
            "probe": None
            if ev.probe is None
            else {
                "set": ev.probe,
                "train": len(data.probe_train),
                "test": len(data.probe_test),
                "c": ev.probe_c,
                "dense": acc["dense"],
                "converted": acc["converted"],
            },
        },
        "latency": [],
    }
    if ev.latency:
        from ..bench.latency import compare_latency

        res = compare_latency({"dense": teacher, "converted": small}, ex[0], rounds=ev.rounds, threads=ev.threads)
        out["latency"].append(
            {
                "batch": 1,
                "threads": res.threads,
                "rounds": res.rounds,
                "dense_ms": 1e3 * res.median_s["dense"],
                "converted_ms": 1e3 * res.median_s["converted"],
                "speedup": res.speedup["converted"],
            }
        )
    return out
