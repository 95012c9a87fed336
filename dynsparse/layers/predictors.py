"""What per-input neuron and head predictors share: the dense recording pass and the fitting of every predictor.

`dense_pass` runs the model in eval mode once over calibration batches with some layers recording what they
compute (their dense outputs), while the *other* kind of within-layer gate runs at keep 1, so the labels come from
layers that no other, maybe still untrained, predictor thins out (token gates, routers and channel gates keep their
budgets: they decide what the layers see). `fit_all` then trains each predictor with Deja Vu's recipe
(`dynsparse.gates.neuron_gates.fit_predictor_`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..gates.neuron_gates import fit_predictor_
from ..knob import budget
from ..modules import modes_kept, module_device

__all__ = ["check_fit_options", "dense_pass", "fit_all"]

log = logging.getLogger(__name__)


def dense_pass(
    model: nn.Module,
    layers: Iterable[nn.Module],
    record: Callable[..., None],
    batches: Iterable,
    max_batches: int | None,
    *,
    others: type,
    owner: str,
) -> int:
    """Run ``model`` in eval mode on at most ``max_batches`` of ``batches`` (no more are read) with ``layers``
    recording (their ``_record`` set to ``record``: they run dense) and every gate of class ``others`` at keep 1;
    each module's own train / eval flag and every budget are restored afterwards. Returns the batches run.

    Raises:
        ConfigError: no batch was given (names ``owner``).
    """
    layers = list(layers)
    other = budget(model, 1.0, kind=others) if any(isinstance(m, others) for m in model.modules()) else None
    device = module_device(model)
    n = 0
    with modes_kept(model):
        model.eval()
        try:
            for m in layers:
                m._record = record
            with torch.no_grad(), other or contextlib.nullcontext():
                for batch in batches if max_batches is None else itertools.islice(batches, max_batches):
                    x = batch[0] if isinstance(batch, (list, tuple)) else batch
                    model(x.to(device))  # a DataLoader's CPU batch for a model on the GPU
                    n += 1
        finally:
            for m in layers:
                m._record = None
    if not n:
        raise ConfigError(f"{owner}: no batch was given")
    return n


def check_fit_options(
    owner: str, *, label_keep: float | None, epochs: int, batch_size: int, max_rows: int, holdout: float
) -> None:
    """Refuse a predictor-training option out of range, naming ``owner`` and the option.

    Raises:
        ConfigError: ``label_keep`` not in (0, 1] (None is fine), ``epochs`` / ``batch_size`` / ``max_rows`` not a
            positive int, ``holdout`` not in [0, 1).
    """
    if label_keep is not None and not (
        isinstance(label_keep, (int, float)) and not isinstance(label_keep, bool) and 0 < label_keep <= 1
    ):
        raise ConfigError(f"{owner}: label_keep must be a fraction in (0, 1], got {label_keep!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("max_rows", max_rows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{owner}: {name} must be a positive int, got {v!r}")
    if isinstance(holdout, bool) or not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
        raise ConfigError(f"{owner}: holdout must be a fraction in [0, 1), got {holdout!r}")


def fit_all(
    data: Mapping[str, tuple[nn.Module, list[Tensor], list[Tensor]]], max_rows: int, what: str, **fit: Any
) -> dict[str, float]:
    """Fit every predictor gate of ``data`` (``{fqn: (gate, rows, labels)}``, the recorded lists) on at most
    ``max_rows`` rows with `fit_predictor_` (options ``fit``); returns ``{fqn: held-out recall}``."""
    out = {}
    for fqn, (gate, xs, ys) in data.items():
        out[fqn] = fit_predictor_(gate, torch.cat(xs)[:max_rows], torch.cat(ys)[:max_rows], **fit)
        log.info("dejavu %s predictor of %s: held-out recall %.3f", what, fqn, out[fqn])
    return out
