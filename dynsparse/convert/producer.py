"""The producer of a module's input channels: what a gate on a layer's *input* must slice outside the layer.

A timm ``DepthwiseSeparableConv`` gates its depthwise channels, which are its input channels, so removing one
also removes an output channel of whatever produced the block's input (the stem conv + norm of an EfficientNet, or
the output projection of the block before). This module finds those modules by walking back through
``nn.Sequential`` containers, through parameter-free channel-wise modules (activations, dropout, pooling) and
channel-wise norms, to the first conv (or a host block whose output is one conv + norm, per the host table), and
slices them. It never traces a graph: where the walk cannot be sure that nothing else reads the tensor, it refuses.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..modules import join_fqn, submodule_or_none
from .surgery import slice_bn_, slice_conv_out_, slice_depthwise_

__all__ = ["check_producers", "input_producers", "slice_producers_", "slot_producers"]

#: Parameter-free modules that act on each channel alone (the walk passes through them).
_CHANNELWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
)


def _kind(m: nn.Module) -> str | None:
    """``"conv"`` (ungrouped), ``"depthwise"``, ``"norm"`` (a per-channel norm, `is_channel_norm`), or None."""
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        if m.groups == 1:
            return "conv"
        if m.groups == m.in_channels == m.out_channels:
            return "depthwise"
        return None
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "norm"
    from ..layers.conv import is_channel_norm  # timm's frozen BatchNorms too; imports timm, so not at module level

    return "norm" if is_channel_norm(m) else None


def _get(model: nn.Module, fqn: str) -> nn.Module:
    return model.get_submodule(fqn) if fqn else model


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _before(model: nn.Module, seq_fqn: str, seq: nn.Sequential, index: int, chain: list[str]) -> list[str]:
    """Producers of the input of child ``index`` of the ``nn.Sequential`` ``seq`` (``chain``: norms passed so far)."""
    from ..integrations import tables as table

    names = list(seq._modules)
    if index > 0 and seq_fqn:  # the output of the child before: does the owner of ``seq`` read it too?
        owner_fqn, _, seq_name = seq_fqn.rpartition(".")
        reason = table.returned_outputs(_get(model, owner_fqn), seq_name)
        if reason is not None:
            raise _Refused(f"its input is the output of {join_fqn(seq_fqn, names[index - 1])!r}, and {reason}")
    for name in reversed(names[:index]):
        fqn, m = join_fqn(seq_fqn, name), seq._modules[name]
        kind = _kind(m)
        if kind == "conv":
            return [fqn, *chain]
        if kind in ("norm", "depthwise"):
            chain.insert(0, fqn)
            continue
        if type(m) in _CHANNELWISE:
            continue
        if isinstance(m, nn.Sequential):
            return _before(model, fqn, m, len(m), chain)
        try:
            proj = table.output_projection(m)
        except UnsupportedModuleError as e:
            raise _Refused(f"its input is the output of {fqn!r} ({type(m).__name__}), and {e.reason}") from None
        if proj is None:
            raise _Refused(
                f"its input is the output of {fqn!r} ({type(m).__name__}), a module the converter cannot slice on "
                "its output channels"
            )
        return [join_fqn(fqn, p) for p in proj] + chain
    return _input_of(model, seq_fqn, chain)


def _input_of(model: nn.Module, fqn: str, chain: list[str]) -> list[str]:
    from ..integrations import tables as table

    if not fqn:
        raise _Refused("its input is the model's input, which has no producer to slice")
    parent_fqn, _, name = fqn.rpartition(".")
    parent = _get(model, parent_fqn)
    if isinstance(parent, nn.Sequential):
        return _before(model, parent_fqn, parent, list(parent._modules).index(name), chain)
    rule = table.input_producers(parent, name)
    if rule is None:
        where = repr(parent_fqn) if parent_fqn else "the model"
        raise _Refused(
            f"no rule says what produces the input of {fqn!r} in {where} ({type(parent).__name__}); known: "
            "nn.Sequential containers and timm EfficientNet / MobileNetV3 models"
        )
    _check_rule_norms(parent, parent_fqn, rule[1:])
    return [join_fqn(parent_fqn, p) for p in rule] + chain


def _check_rule_norms(parent: nn.Module, parent_fqn: str, norms: tuple[str, ...]) -> None:
    """Refuse unless every norm a host-table rule names (``bn1`` after ``conv_stem``) acts on each channel alone.

    A rule names children by role, whatever their type: a stem built with ``norm_layer=GroupNormAct`` (or one
    swapped in by hand) would otherwise be sliced channel by channel, which changes every kept channel.
    """
    from ..layers.conv import norm_reason

    for name in norms:
        reason = norm_reason(parent, name)
        if reason is not None:
            fqn = join_fqn(parent_fqn, name)
            raise _Refused(f"its input channels are normalized by {fqn!r}, and {reason}")


def input_producers(model: nn.Module, fqn: str, dimension: str = "channels") -> list[str]:
    """The modules whose output channels are the input channels of the module at ``fqn``, producer first.

    The first name is the conv that makes the channels (``"conv_stem"``, ``"blocks.0.0.conv_pw"``), the others the
    per-channel norms after it (``"bn1"``); slicing all of them on the same keep indices removes input channels of
    ``fqn`` exactly, since nothing else reads that tensor.

    Args:
        model: The whole model (gated or not).
        fqn: Qualified name of the layer whose input channels are gated (e.g. ``"blocks.0.0"``).
        dimension: The dimension word, for the error.

    Raises:
        UnsupportedModuleError: no producer can be sliced exactly; the message names ``fqn`` and the module that
            stops the walk (e.g. a block with a skip connection, whose output is also its input).

    Example:
        >>> input_producers(timm.create_model("efficientnet_b0"), "blocks.0.0")  # doctest: +SKIP
        ['conv_stem', 'bn1']
    """
    try:
        found = _input_of(model, fqn, [])
    except _Refused as e:
        module = _get(model, fqn)
        reason = f"{e.reason} (keep every channel of this gate, or exclude the layer from {dimension!r})"
        raise UnsupportedModuleError(fqn, type(module).__name__, dimension, reason, action="convert") from None
    return found


def slot_producers(model: nn.Module, fqn: str, dimension: str) -> list[str] | None:
    """`input_producers` of the layer owning the gate slot at ``fqn`` when the slot gates the layer's input channels
    (`GatedLayer.input_slots`); None for a slot on a layer's internal units.

    Raises:
        UnsupportedModuleError: the slot gates input channels whose producer cannot be sliced exactly.
    """
    from ..integrations import tables as table

    if dimension in ("layers", "width"):
        return None
    parent, child = table.slot_owner(model, fqn, dimension)
    gated_cls = table.gated_class(dimension, _get(model, parent))
    if gated_cls is None or child not in getattr(gated_cls, "input_slots", ()):
        return None
    return input_producers(model, parent, dimension)


def check_producers(model: nn.Module, fqns: list[str], num_units: int | None, owner: str = "") -> None:
    """Raise unless every module of ``fqns`` is a conv or BatchNorm of ``model`` with ``num_units`` output channels.

    Raises:
        ConfigError: a recorded producer is missing, of another kind, or of another width (names ``owner``).
    """
    from ..errors import ConfigError

    for fqn in fqns:
        m = submodule_or_none(model, fqn)
        kind = _kind(m) if m is not None else None
        if kind is None:
            raise ConfigError(f"slice plan producers of {owner!r}: {fqn!r} is not a conv or BatchNorm of the model")
        n = m.num_features if kind == "norm" else m.out_channels
        if num_units is not None and n != num_units:
            raise ConfigError(
                f"slice plan producers of {owner!r}: {fqn!r} has {n} channels, the gate has {num_units} units"
            )


def slice_producers_(model: nn.Module, fqns: list[str], idx: Tensor) -> None:
    """Keep output channels ``idx`` of every module named in ``fqns`` (convs, depthwise convs, BatchNorms), in place."""
    for fqn in fqns:
        m = _get(model, fqn)
        kind = _kind(m)
        if kind == "conv":
            slice_conv_out_(m, idx)
        elif kind == "depthwise":
            slice_depthwise_(m, idx)
        elif kind == "norm":
            slice_bn_(m, idx)
        else:
            raise UnsupportedModuleError(
                fqn, type(m).__name__, "channels", "only convs and per-channel norms are sliced", action="convert"
            )
