"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

IMP trains θ0 to θ_T, prunes a fraction of the *remaining* weights of each layer by |θ_T|, resets the survivors
to θ0 and trains again, for several rounds; the pruned sub-network at its original init is the "ticket". Late
rewinding resets to θ_k, the weights after k training steps, instead of θ0. `LotteryTicket` holds the rewind point
and the pruning rule (on top of `unstructured_`, so masks only grow); `imp` runs the rounds with your training
function; `reinit_` is the random re-initialization control (same masks, fresh init).

A rewind restores values only: build a fresh optimizer after it (methods.md §3: LTH resets must also reset the
optimizer), and with late rewinding train the later rounds from step k on, as the paper does.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import suggest
from .unstructured import _MASKED, Sparsity, _check_layers, _old_mask, _targets, reapply_masks_, unstructured_

__all__ = ["ImpResult", "LotteryRound", "LotteryTicket", "imp", "reinit_"]

log = logging.getLogger(__name__)

_GLOBAL = "*"  # key of the global group's density (no module fqn is "*")
#: Groups a ticket prunes in: each layer, or the layers without an override together (not unstructured_'s "row").
_SCOPES = ("layer", "global")


def _check_rate(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(
            f"{name} must be the fraction of the remaining weights pruned per round, in [0, 1), got {value!r}"
        )
    return float(value)


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _values(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` by name, except the masks of masked layers."""
    skip = {id(m.weight_mask) for m in model.modules() if isinstance(m, _MASKED)}
    out = dict(model.named_parameters())
    out.update((name, b) for name, b in model.named_buffers() if id(b) not in skip)
    return out


def _match(saved: Mapping[str, Tensor], current: Mapping[str, Tensor], where: str) -> None:
    missing, extra = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    if missing or extra:
        why = f"missing from the model {missing[:5]}, not in the snapshot {extra[:5]}"
        raise ConfigError(f"{where}: the model's structure no longer matches the snapshot: {why}")
    for name, t in saved.items():
        if t.shape != current[name].shape:
            shapes = f"{tuple(current[name].shape)} in the model, {tuple(t.shape)} in the snapshot"
            raise ConfigError(f"{where}: {name!r} has shape {shapes}")


def reinit_(model: nn.Module, seed: int, init_fn: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Random re-initialization control: fresh values for every parameter, same masks; in place, returns ``model``.

    Calls each module's ``reset_parameters`` (or ``init_fn(model)``) under ``torch.manual_seed(seed)`` inside
    `torch.random.fork_rng` (the global RNG is left as it was), then zeroes the masked weights again. Modules with
    their own parameters but no ``reset_parameters`` are logged as a warning (pass ``init_fn`` for them).

    Args:
        model: The (pruned) model.
        seed: Seed of the fresh init; the same seed gives the same values.
        init_fn: Custom initializer of the whole model, e.g. a timm model's ``init_weights``.
    """
    seed = _check_count(seed, "seed")
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    missed = []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        if init_fn is not None:
            init_fn(model)
        else:
            for fqn, module in model.named_modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
                elif next(module.parameters(recurse=False), None) is not None:
                    missed.append(fqn or "<root>")
    if missed:
        log.warning("reinit_: %s have parameters but no reset_parameters; left as they were", missed)
    return reapply_masks_(model)


@dataclass(frozen=True)
class LotteryRound:
    """One IMP round: the training at one sparsity.

    Attributes:
        round: 0 for the dense training, r after r pruning steps.
        sparsity: Fraction of the ticket's weights pruned during this round's training.
        layers: ``{param_fqn: fraction pruned}`` of the ticket's layers.
        result: What ``train_fn`` returned (e.g. test accuracy).
    """

    round: int
    sparsity: float
    layers: dict[str, float] = field(default_factory=dict)
    result: Any = None


@dataclass(frozen=True)
class ImpResult:
    """Output of `imp`: the ticket (its model is trained at the final sparsity) and one `LotteryRound` per training."""

    ticket: LotteryTicket
    rounds: list[LotteryRound]


class LotteryTicket:
    """Rewind point and pruning rule of iterative magnitude pruning (IMP) on ``model``.

    At creation the ticket saves every parameter and buffer (BN statistics included) as the rewind point θ0, or,
    with ``rewind_step=k > 0``, waits for `step` to be called with ``k`` (late rewinding: call ``ticket.step(t)``
    after each optimizer step of the first training, ``t`` = steps taken so far) or for an explicit `snapshot_`.
    `prune_` masks ``rate`` of the remaining weights of each selected layer by magnitude (after ``r`` rounds a layer
    has ``round((1 - (1 - rate)^r) * n)`` of its ``n`` weights pruned, exactly); `rewind_` puts the saved values
    back and keeps the masks (pruned weights stay 0); `reinit_` is the random re-init control.

    Args:
        model: The model; modified in place by `prune_`, `rewind_`, `reinit_`.
        rate: Fraction of the remaining weights pruned per round, in [0, 1) (the LeNet paper: 0.2).
        rates: Per-layer overrides ``{module fqn glob: rate}``, e.g. ``{"fc3": 0.1}`` for the output layer (the
            first matching pattern wins; each must match a selected layer; ``0.0`` never prunes it).
        scope: ``"layer"`` (each layer loses ``rate`` of its own weights, the LeNet paper's way) or ``"global"``
            (the layers without an override are ranked together, as open_lth does).
        rewind_step: ``0`` rewinds to θ0; ``k > 0`` to the weights after ``k`` optimizer steps.
        include: fqn globs of the modules to prune (default: every ``layers`` module).
        exclude: fqn globs of modules never pruned (e.g. the output layer, open_lth's default).
        layers: Host classes to prune (exact types), see `unstructured_`.

    Raises:
        ConfigError: bad ``rate`` / ``rates`` / ``scope`` / ``rewind_step``, a ``rates`` pattern that matches no
            selected layer, or no layer selected.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 4))
        >>> ticket = LotteryTicket(model, rate=0.2, rates={"2": 0.1})  # saves θ0
        >>> theta0 = model[0].weight.detach().clone()
        >>> with torch.no_grad():  # stands for training
        ...     _ = model[0].weight.add_(torch.randn(10, 8))
        >>> _ = ticket.prune_().rewind_()
        >>> ticket.sparsity().layers
        {'0.weight': 0.2, '2.weight': 0.1}
        >>> keep = model[0].weight_mask
        >>> torch.equal(model[0].weight[keep], theta0[keep]), bool((model[0].weight[~keep] == 0).all())
        (True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rate: float = 0.2,
        rates: Mapping[str, float] | None = None,
        scope: Literal["layer", "global"] = "layer",
        rewind_step: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        layers: Sequence[type[nn.Module]] = (nn.Linear, nn.Conv2d),
    ) -> None:
        self.model = model
        self.rate = _check_rate(rate, "rate")
        if scope not in _SCOPES:
            raise ConfigError(
                f"LotteryTicket: unknown scope {scope!r}.{suggest(str(scope), _SCOPES)} Known: {', '.join(_SCOPES)}"
            )
        self.scope = scope
        self.rewind_step = _check_count(rewind_step, "rewind_step")
        self.layers = _check_layers(layers)
        targets = _targets(model, include, exclude, self.layers)
        if not targets:
            raise ConfigError(f"LotteryTicket: no prunable layer matches include={include!r}, exclude={exclude!r}")
        #: Module fqns of the pruned layers.
        self.fqns = tuple(fqn for fqn, _, _ in targets)
        self.rates = dict(rates or {})
        override: dict[str, float] = {}
        for pattern, value in self.rates.items():
            if not isinstance(pattern, str):
                raise ConfigError(f"rates keys must be module fqn globs, got {pattern!r}")
            value = _check_rate(value, f"rates[{pattern!r}]")
            hits = [f for f in self.fqns if fnmatch.fnmatchcase(f, pattern)]
            if not hits:
                raise ConfigError(
                    f"rates: {pattern!r} matches no pruned layer.{suggest(pattern, self.fqns)} "
                    f"Pruned layers: {', '.join(self.fqns)}"
                )
            for f in hits:
                override.setdefault(f, value)
        self._override = override
        rest = [f for f in self.fqns if f not in override]
        groups = {f: [f] for f in (self.fqns if scope == "layer" else override)}
        self._groups = {**groups, _GLOBAL: rest} if scope == "global" and rest else groups
        self._density = {key: self._kept(fqns) for key, fqns in self._groups.items()}
        #: Pruning rounds done.
        self.round = 0
        #: Step at which the rewind point was saved (None before it is).
        self.snapshot_step: int | None = None
        self._snapshot: dict[str, Tensor] | None = None
        if self.rewind_step == 0:
            self.snapshot_(0)

    def _module(self, fqn: str, where: str) -> nn.Module:
        try:
            module = self.model.get_submodule(fqn)
        except AttributeError:
            module = None
        if type(module) not in self.layers + tuple(m for m in _MASKED if m.host in self.layers):
            what = type(module).__name__ if module is not None else "gone"
            raise ConfigError(f"{where}: the model's structure no longer matches the ticket: {fqn!r} is {what}")
        return module

    def _kept(self, fqns: Sequence[str]) -> float:
        ms = [_old_mask(self._module(f, "LotteryTicket")) for f in fqns]
        return sum(int(m.sum()) for m in ms) / sum(m.numel() for m in ms)

    def snapshot_(self, step: int | None = None) -> LotteryTicket:
        """Save the current parameters and buffers as the rewind point (replacing any earlier one); return self.

        ``step`` (the training step they belong to) is only recorded, as `snapshot_step`.
        """
        self._snapshot = {name: t.detach().clone() for name, t in _values(self.model).items()}
        self.snapshot_step = step
        log.debug("LotteryTicket: rewind point saved at step %s", step)
        return self

    def step(self, step: int) -> bool:
        """Training hook: call after each optimizer step with the steps taken so far (1, 2, ...).

        Saves the rewind point when ``step == rewind_step`` and none is saved yet (so only during the first
        training); returns whether it did.
        """
        if self._snapshot is None and step == self.rewind_step:
            self.snapshot_(step)
            return True
        return False

    def prune_(self, rate: float | None = None) -> LotteryTicket:
        """Prune ``rate`` (default: the ticket's) of the remaining weights by magnitude; per-layer ``rates`` win.

        Each group (a layer, or all non-overridden layers for ``scope="global"``) keeps the fraction
        ``prod(1 - rate_i)`` over the rounds so far of its weights, counted exactly by `unstructured_`; pruned
        weights stay pruned. Returns self.
        """
        rate = self.rate if rate is None else _check_rate(rate, "rate")
        for key, fqns in self._groups.items():
            for f in fqns:
                self._module(f, "prune_")
            r = rate if key == _GLOBAL else self._override.get(key, rate)
            self._density[key] *= 1.0 - r
            unstructured_(
                self.model,
                1.0 - self._density[key],
                scope="global" if key == _GLOBAL else "layer",
                include=[glob.escape(f) for f in fqns],
                layers=self.layers,
            )
        self.round += 1
        log.info("LotteryTicket: round %d, sparsity %.4f", self.round, self.sparsity().overall)
        return self

    def rewind_(self) -> LotteryTicket:
        """Put the saved parameters and buffers back, keep the masks (pruned weights are set to 0); return self.

        Raises:
            ConfigError: No rewind point yet (``rewind_step`` not reached), or the model's parameters and buffers
                no longer have the snapshot's names and shapes.
        """
        if self._snapshot is None:
            raise ConfigError(
                f"rewind_: no rewind point yet: rewind_step={self.rewind_step} was not reached (call "
                f"ticket.step(t) after each optimizer step of the first training, or ticket.snapshot_())"
            )
        current = _values(self.model)
        _match(self._snapshot, current, "rewind_")
        with torch.no_grad():
            for name, t in current.items():
                t.copy_(self._snapshot[name])
        reapply_masks_(self.model)
        return self

    def reinit_(self, seed: int, init_fn: Callable[[nn.Module], None] | None = None) -> LotteryTicket:
        """The random re-init control on the ticket's model (see the function `reinit_`); return self."""
        reinit_(self.model, seed, init_fn)
        return self

    def sparsity(self) -> Sparsity:
        """Fraction of the ticket's weights pruned, overall and per layer (``{param_fqn: fraction}``)."""
        layers, pruned, total = {}, 0, 0
        for f in self.fqns:
            m = _old_mask(self._module(f, "sparsity"))
            p = m.numel() - int(m.sum())
            layers[f"{f}.weight"] = p / m.numel()
            pruned, total = pruned + p, total + m.numel()
        return Sparsity(pruned / total, layers, pruned, total)

    def state_dict(self) -> dict[str, Any]:
        """Ticket state for resuming: round, target densities, rewind point (tensors). Masks live in the model."""
        snapshot = None if self._snapshot is None else {k: v.clone() for k, v in self._snapshot.items()}
        state = {"round": self.round, "densities": dict(self._density), "rewind_step": self.rewind_step}
        return {**state, "snapshot_step": self.snapshot_step, "snapshot": snapshot}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict` output into a ticket built with the same arguments on the same model.

        Raises:
            ConfigError: The saved ticket pruned other layers / groups or used another ``rewind_step``, or its
                rewind point does not match the model's parameters and buffers.
        """
        saved, ours = sorted(state["densities"]), sorted(self._density)
        if saved != ours:
            raise ConfigError(f"load_state_dict: the saved ticket prunes {saved}, this one {ours}")
        if state["rewind_step"] != self.rewind_step:
            why = f"saved rewind_step={state['rewind_step']}, this ticket's {self.rewind_step}"
            raise ConfigError(f"load_state_dict: {why}")
        snapshot = state["snapshot"]
        if snapshot is not None:
            current = _values(self.model)
            _match(snapshot, current, "load_state_dict")
            snapshot = {k: v.detach().to(current[k].device).clone() for k, v in snapshot.items()}
        self._snapshot = snapshot
        self.snapshot_step = state["snapshot_step"]
        self.round = int(state["round"])
        self._density = {k: float(v) for k, v in state["densities"].items()}


def imp(
    model: nn.Module,
    train_fn: Callable[[nn.Module, LotteryTicket], Any],
    *,
    rounds: int,
    rate: float = 0.2,
    rates: Mapping[str, float] | None = None,
    scope: Literal["layer", "global"] = "layer",
    rewind_step: int = 0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layers: Sequence[type[nn.Module]] = (nn.Linear, nn.Conv2d),
) -> ImpResult:
    """Iterative magnitude pruning: ``rounds`` times train → prune → rewind, then a last training; in place.

    ``train_fn(model, ticket)`` trains the model once (with a fresh optimizer) and returns anything (e.g. the
    test accuracy); ``ticket.round`` is the round being trained. With ``rewind_step=k > 0`` it must call
    ``ticket.step(t)`` after each optimizer step (the first training saves θ_k), and should train the later
    rounds from step k on (``ticket.round > 0``). The density after ``r`` rounds is ``(1 - rate)^r`` per layer.

    Args:
        model: The model at θ0.
        train_fn: ``(model, ticket) -> result``.
        rounds: Number of pruning rounds (``rounds + 1`` trainings), >= 0. The other arguments go to `LotteryTicket`.

    Returns:
        `ImpResult`: the ticket (its model trained at the final sparsity; ``ticket.reinit_(seed)`` gives the
        control) and one `LotteryRound` per training.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> model, x = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 4)), torch.randn(32, 8)
        >>> def train(model, ticket):  # a fresh optimizer each round
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     for t in range(1, 11):
        ...         opt.zero_grad()
        ...         model(x).pow(2).mean().backward()
        ...         opt.step()
        ...         ticket.step(t)  # saves θ_3 in the first training
        >>> out = imp(model, train, rounds=2, rate=0.5, rewind_step=3)
        >>> [(r.round, r.sparsity) for r in out.rounds]
        [(0, 0.0), (1, 0.5), (2, 0.75)]
    """
    rounds = _check_count(rounds, "rounds")
    if not callable(train_fn):
        raise ConfigError(f"imp: train_fn must be a callable (model, ticket) -> result, got {train_fn!r}")
    kwargs = {"rate": rate, "rates": rates, "scope": scope, "include": include, "exclude": exclude, "layers": layers}
    ticket = LotteryTicket(model, rewind_step=rewind_step, **kwargs)
    out = []
    for r in range(rounds + 1):
        result = train_fn(model, ticket)
        s = ticket.sparsity()
        out.append(LotteryRound(r, s.overall, s.layers, result))
        log.info("imp: round %d at sparsity %.4f: %s", r, s.overall, result)
        if r < rounds:
            ticket.prune_().rewind_()
    return ImpResult(ticket, out)
