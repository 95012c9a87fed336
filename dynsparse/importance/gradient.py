"""Per-weight scores from gradients: gradient, Taylor / OBD, SNIP, GraSP, SynFlow.

Every function returns ``{param_fqn: scores}`` (the weight's shape, detached, on the CPU, in the weight's dtype
but float32 at least) for the ``weight`` of
every ``nn.Linear`` / ``nn.Conv2d`` selected by module fqn globs (not the layers of gates), and **higher = more
important = kept**, like every score of `dynsparse.importance`. Gradients are taken with ``torch.autograd.grad``
(grad mode is enabled for it, so a caller under ``torch.no_grad()`` gets the same scores): no ``.grad`` of the
model is touched. The model's training flags and buffers (BatchNorm statistics) are restored afterwards.

A batch is an input tensor or an ``(inputs, targets, ...)`` tuple; ``loss_fn(output, targets)`` (or
``loss_fn(output)`` for a batch without targets) returns a scalar, e.g. ``torch.nn.functional.cross_entropy``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..gates import Gate, InputDependentGate
from ._util import LossFn, batch_loss, batches, double_backward_ok, requiring_grad, scoring_mode, weight_modules

__all__ = ["gradient", "grasp", "obd", "snip", "synflow", "taylor"]

Globs = str | Sequence[str] | None


def _grads(loss: Tensor, params: list[Tensor], create_graph: bool = False) -> list[Tensor]:
    gs = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True)]


def _batch_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    params: list[Tensor],
    train: bool,
    max_batches: int | None,
    owner: str,
    with_squares: bool = False,
) -> tuple[list[Tensor], list[Tensor], int]:
    """Sum over batches of ``∂L_b/∂w`` (and of ``(∂L_b/∂w)²``), and the number of batches."""
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    squares = [torch.zeros_like(p, dtype=torch.float64) for p in params] if with_squares else []
    n = 0
    with scoring_mode(model, train), requiring_grad(params), torch.enable_grad():
        for batch in batches(data, max_batches, owner):
            gs = _grads(batch_loss(model, loss_fn, batch), params)
            for i, g in enumerate(gs):
                total[i] += g.detach().double()
                if with_squares:
                    squares[i] += g.detach().double().pow(2)
            n += 1
    return total, squares, n


def _out(keys: list[str], params: list[Tensor], values: list[Tensor]) -> dict[str, Tensor]:
    """The float64 scores on the CPU in the weight's dtype, float32 at least (in float16, ``½·F·w²`` underflows)."""
    return {
        k: v.to(torch.promote_types(p.dtype, torch.float32)).cpu() for k, p, v in zip(keys, params, values, strict=True)
    }


def gradient(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    train: bool = False,
    include: Globs = None,
    exclude: Globs = None,
) -> dict[str, Tensor]:
    """Gradient magnitude ``|ḡ|`` with ``ḡ = mean_b ∂L_b/∂w`` over the batches (the abs is taken last).

    Args:
        model: Any module.
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        data: Iterable of batches.
        max_batches: Use at most this many batches.
        train: Run in train mode (dropout, batch statistics; buffers are restored) instead of eval mode.
        include: Module fqn glob patterns to score.
        exclude: Module fqn glob patterns left out.
    """
    modules = weight_modules(model, include, exclude)
    keys, params = list(modules), [m.weight for m in modules.values()]
    total, _, n = _batch_gradients(model, loss_fn, data, params, train, max_batches, "gradient")
    return _out(keys, params, [(t / n).abs() for t in total])


def taylor(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    order: int = 1,
    *,
    max_batches: int | None = None,
    train: bool = False,
    include: Globs = None,
    exclude: Globs = None,
) -> dict[str, Tensor]:
    """Taylor estimates of the loss change when a weight is set to 0.

    * ``order=1``: ``|w ⊙ ḡ|`` with ``ḡ = mean_b ∂L_b/∂w`` (first-order term ``-g·w`` of
      ``L(w=0) - L(w)``; the abs is taken after averaging, as SNIP does within a batch).
    * ``order=2``: OBD saliency ``½ · F_ii · w_i²`` (LeCun et al. 1989; methods.md 2.13) with the diagonal
      empirical Fisher ``F_ii = mean_b (∂L_b/∂w_i)²`` over **mini-batch** gradients standing in for the Hessian
      diagonal (the gradient term is dropped, as at a minimum). With batches of one example this is the
      per-example empirical Fisher; larger batches give a cheaper, lower-variance-of-gradient estimate of it.

    Args:
        model: Any module.
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        data: Iterable of batches.
        order: 1 or 2.
        max_batches: Use at most this many batches.
        train: Run in train mode instead of eval mode (buffers are restored).
        include: Module fqn glob patterns to score.
        exclude: Module fqn glob patterns left out.
    """
    if order not in (1, 2) or isinstance(order, bool):
        raise ConfigError(f"taylor: order must be 1 or 2, got {order!r}")
    modules = weight_modules(model, include, exclude)
    keys, params = list(modules), [m.weight for m in modules.values()]
    total, squares, n = _batch_gradients(
        model, loss_fn, data, params, train, max_batches, "taylor", with_squares=order == 2
    )
    ws = [p.detach().double() for p in params]
    if order == 1:
        values = [(w * t / n).abs() for w, t in zip(ws, total, strict=True)]
    else:
        values = [0.5 * (s / n) * w.pow(2) for w, s in zip(ws, squares, strict=True)]
    return _out(keys, params, values)


def obd(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    train: bool = False,
    include: Globs = None,
    exclude: Globs = None,
) -> dict[str, Tensor]:
    """OBD saliency ``½ · F_ii · w_i²`` with a diagonal empirical Fisher: ``taylor(..., order=2)``."""
    return taylor(model, loss_fn, data, 2, max_batches=max_batches, train=train, include=include, exclude=exclude)


def snip(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    train: bool = True,
    include: Globs = None,
    exclude: Globs = None,
) -> dict[str, Tensor]:
    """SNIP connection sensitivity ``s = |w ⊙ ∂L/∂w| / Σ |w ⊙ ∂L/∂w|`` (Lee et al. 2019; methods.md 2.3).

    ``L`` is the loss of **one** mini-batch (the abs is taken after the batch sum, as in the paper); the sum in
    the denominator runs over every selected weight (global normalisation), so the scores sum to 1. Keep the
    top ``1 - sparsity`` globally: ``unstructured_masks(scores, sparsity)``.

    Args:
        model: Any module (at initialisation, in the paper).
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        batch: One batch (a tensor or an ``(inputs, targets)`` tuple).
        train: Train mode (the reference default; buffers are restored) or eval mode.
        include: Module fqn glob patterns to score.
        exclude: Module fqn glob patterns left out.
    """
    modules = weight_modules(model, include, exclude)
    keys, params = list(modules), [m.weight for m in modules.values()]
    with scoring_mode(model, train), requiring_grad(params), torch.enable_grad():
        gs = _grads(batch_loss(model, loss_fn, batch), params)
    raw = [(p.detach() * g.detach()).abs().double() for p, g in zip(params, gs, strict=True)]
    total = sum(float(r.sum()) for r in raw)
    return _out(keys, params, [r / total if total > 0 else r for r in raw])


def grasp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    temperature: float = 200.0,
    *,
    train: bool = True,
    include: Globs = None,
    exclude: Globs = None,
) -> dict[str, Tensor]:
    """GraSP scores, **negated** so that higher = keep: returns ``θ ⊙ Hg`` (Wang et al. 2020; methods.md 2.4).

    GraSP's own score is ``S(-θ) = -θ ⊙ Hg`` and it **removes the largest** ``S``; this function returns
    ``-S = θ ⊙ Hg`` so that, like every score of the package, the lowest scores are pruned
    (``unstructured_masks(scores, sparsity)``, global scope as in the paper). ``g = ∇L`` (held constant) and
    ``Hg`` come from double back-prop: ``Hg = ∇(gᵀ∇L)``, with the gradient and Hessian restricted to the
    selected weights. The logits are divided by ``temperature`` (T = 200) before ``loss_fn``. Unlike the
    reference code, weights are not re-initialised and the scores are not divided by ``|ΣS|`` (a positive
    scale that does not change the ranking). ``model`` is left unchanged (weights, buffers, flags, ``.grad``).
    ``scaled_dot_product_attention`` runs its math kernel meanwhile (the fused CPU kernels have no double
    backward).

    Args:
        model: Any module whose forward is twice differentiable.
        loss_fn: ``loss_fn(output / temperature, targets) -> scalar``.
        batch: One batch (the reference code sums over two halves of its sample; pass them as one batch).
        temperature: Divides the model output before the loss.
        train: Train mode (the reference does not switch to eval; buffers are restored) or eval mode.
        include: Module fqn glob patterns to score.
        exclude: Module fqn glob patterns left out.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"grasp: temperature must be a positive number, got {temperature!r}")
    modules = weight_modules(model, include, exclude)
    keys, params = list(modules), [m.weight for m in modules.values()]
    with scoring_mode(model, train), requiring_grad(params), double_backward_ok(), torch.enable_grad():
        loss = batch_loss(model, loss_fn, batch, temperature=float(temperature))
        gs = _grads(loss, params, create_graph=True)
        z = sum((g.detach() * g).sum() for g in gs)
        if not isinstance(z, Tensor) or not z.requires_grad:  # a loss linear in the weights: H = 0
            hg = [torch.zeros_like(p) for p in params]
        else:
            hg = _grads(z, params)
    return _out(keys, params, [p.detach().double() * h.detach().double() for p, h in zip(params, hg, strict=True)])


def synflow(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    sparsity: float = 0.0,
    iterations: int = 100,
    include: Globs = None,
    exclude: Globs = None,
) -> dict[str, Tensor]:
    """SynFlow scores ``|θ ⊙ ∂R/∂θ|``, data-free and iterative (Tanaka et al. 2020; methods.md 2.5).

    On a float64 deep copy of ``model`` in eval mode (``model`` itself is never touched, so its signs, weights,
    buffers and flags are unchanged by construction): every floating parameter and buffer is replaced by its
    absolute value (the linearisation; the state of dynsparse gates is left as it is, so a closed gate stays
    closed), the input is one all-ones example and ``R = sum(model(1))``. With
    ``sparsity > 0`` the selected weights are pruned in ``iterations`` rounds to the densities
    ``d_k = (1 - sparsity)^(k / n)``, k = 1…n (exponential schedule, global scope), re-scoring with the current
    masks each round. The scores of the last round are returned (weights pruned by earlier rounds score 0), so
    ``unstructured_masks(scores, sparsity)`` gives the final mask (up to ties among zero scores).

    Note the naming: the reference code's ``sparsity`` argument is a *density*; here ``sparsity`` is the
    fraction removed, as everywhere in dynsparse.

    Args:
        model: Any module taking one float tensor.
        input_shape: Shape of one example, without the batch dimension (e.g. ``(3, 32, 32)``).
        sparsity: Final fraction of the selected weights pruned by the iterative schedule, in [0, 1).
            ``0`` scores once, without pruning.
        iterations: Number of pruning rounds ``n`` (the paper uses 100).
        include: Module fqn glob patterns to score and prune.
        exclude: Module fqn glob patterns left out.

    Returns:
        ``{param_fqn: float64 scores}`` (float64 because ``R`` overflows float32 in deep nets).
    """
    from .masks import unstructured_masks

    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"synflow: sparsity must be a number in [0, 1), got {sparsity!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"synflow: iterations must be an int >= 1, got {iterations!r}")
    shape = tuple(int(s) for s in input_shape)
    work = copy.deepcopy(model).double().eval()
    gate_state = {
        id(t)
        for m in work.modules()
        if isinstance(m, (Gate, InputDependentGate))
        for t in itertools.chain(m.parameters(), m.buffers())
    }
    with torch.no_grad():
        for t in itertools.chain(work.parameters(), work.buffers()):
            if t.is_floating_point() and id(t) not in gate_state:
                t.abs_()
    modules = weight_modules(work, include, exclude)
    keys, params = list(modules), [m.weight for m in modules.values()]
    originals = [p.detach().clone() for p in params]
    device = params[0].device
    ones = torch.ones((1, *shape), dtype=torch.float64, device=device)
    masks = {k: torch.ones(p.shape, dtype=torch.bool) for k, p in zip(keys, params, strict=True)}
    rounds = iterations if sparsity > 0 else 1
    scores: dict[str, Tensor] = {}
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for key, p, w in zip(keys, params, originals, strict=True):
                p.copy_(w * masks[key].to(device))
        with requiring_grad(params), torch.enable_grad():
            gs = _grads(work(ones).sum(), params)
        scores = {key: (p.detach() * g).abs().cpu() for key, p, g in zip(keys, params, gs, strict=True)}
        if sparsity > 0:
            alive = {key: torch.where(masks[key], s, torch.full_like(s, -1.0)) for key, s in scores.items()}
            masks = unstructured_masks(alive, 1.0 - (1.0 - sparsity) ** (k / rounds))
    return scores
