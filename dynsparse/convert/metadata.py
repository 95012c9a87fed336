"""The JSON metadata of model files besides architecture and plan: what the input is (``data``), and the gate
settings that live outside the state dict (``settings``; also recorded by the recipe trainer's checkpoints)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError, DynsparseError

__all__ = ["DATA_FIELDS", "TEXT_DATA_FIELDS", "check_data", "gate_settings", "restore_gate_settings_"]

#: Fields of the optional ``data`` metadata of an image model: what a user needs to feed the model.
DATA_FIELDS = ("dataset", "image_size", "channels", "input_shape", "mean", "std")
#: Fields of the ``data`` metadata of a text encoder (a sentence-embedding run): the text sets it was distilled on,
#: the tokens per sentence it was trained at, and where its tokenizer comes from (model files hold no tokenizer).
TEXT_DATA_FIELDS = ("distill", "max_length", "tokenizer")


def check_data(data: Mapping[str, Any], where: str = "data") -> dict[str, Any]:
    """``data`` checked: known fields only, each of the right type; errors name ``where`` and the field.

    An image model's fields (`DATA_FIELDS`): ``dataset`` a name; ``image_size`` an int, an ``[H, W]`` pair or null
    (native size); ``channels`` 1, 3 or null; ``input_shape`` the ``[C, H, W]`` of one input; ``mean`` / ``std``
    one number per channel (empty: not normalised).

    A text encoder's fields (`TEXT_DATA_FIELDS`): ``distill`` the names of the text sets
    (`dynsparse.data.text`) it was distilled on; ``max_length`` the tokens per sentence it was trained at;
    ``tokenizer`` a registered encoder name (`dynsparse.pretrained`) or the directory its tokenizer was read from.
    One object holds the fields of one kind, never both.
    """
    import difflib

    known = DATA_FIELDS + TEXT_DATA_FIELDS
    listing = f"{', '.join(DATA_FIELDS)} (images); {', '.join(TEXT_DATA_FIELDS)} (text)"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected an object with fields {listing}, got {data!r}")
    data = dict(data)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown field {key!r}.{hint} Known fields: {listing}")
    image, text = [k for k in data if k in DATA_FIELDS], [k for k in data if k in TEXT_DATA_FIELDS]
    if image and text:
        raise ConfigError(
            f"{where}: fields {image} describe images and {text} text; a model's data holds the fields of one kind"
        )

    def ints(v: Any, n: int) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == n and all(_is_int(i) and i >= 1 for i in v)

    checks = {
        "dataset": (lambda v: isinstance(v, str) and v != "", "a data set name"),
        "image_size": (lambda v: v is None or (_is_int(v) and v >= 1) or ints(v, 2), "an int, [H, W] or null"),
        "channels": (lambda v: v is None or (_is_int(v) and v in (1, 3)), "1, 3 or null"),
        "input_shape": (lambda v: ints(v, 3), "[C, H, W], three positive ints"),
        "mean": (lambda v: isinstance(v, (list, tuple)) and all(_is_num(i) for i in v), "a list of numbers"),
        "std": (lambda v: isinstance(v, (list, tuple)) and all(_is_num(i) and i > 0 for i in v), "positive numbers"),
        "distill": (
            lambda v: isinstance(v, (list, tuple)) and v and all(isinstance(i, str) and i for i in v),
            "a non-empty list of text set names",
        ),
        "max_length": (lambda v: _is_int(v) and v >= 1, "a positive int (tokens per sentence)"),
        "tokenizer": (lambda v: isinstance(v, str) and v != "", "an encoder name or a directory"),
    }
    for key, value in data.items():
        ok, what = checks[key]
        if not ok(value):
            raise ConfigError(f"{where}: field {key!r} must be {what}, got {value!r}")
        if isinstance(value, tuple):
            data[key] = list(value)
    if len(data.get("mean", ())) != len(data.get("std", ())):
        raise ConfigError(
            f"{where}: fields 'mean' and 'std' need the same length, got {data.get('mean')} / {data.get('std')}"
        )
    c = data.get("input_shape", [None])[0]
    if c is not None and data.get("channels") is not None and data["channels"] != c:
        raise ConfigError(
            f"{where}: field 'channels' ({data['channels']}) and the channels of 'input_shape' ({c}) differ: the "
            "images are converted to 'channels' before they reach the model"
        )
    c = c if c is not None else data.get("channels")
    if c is not None and data.get("mean") and len(data["mean"]) != c:
        raise ConfigError(f"{where}: field 'mean' needs one value per input channel ({c}), got {data['mean']}")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def gate_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{gate_fqn: settings}`` of the gate state that is not in the state dict.

    A `TopKGate` records ``{"k": k}`` (changed by ``set_k_``), an input-dependent gate ``{"keep": keep}`` (its
    run-time budget, changed by ``set_budget_``; None: a threshold gate's learned thresholds).
    """
    from ..gate_ops import named_gates
    from ..gates import InputDependentGate, TopKGate

    out: dict[str, dict[str, Any]] = {}
    for fqn, g in named_gates(model):
        if isinstance(g, TopKGate):
            out[fqn] = {"k": g.k}
        elif isinstance(g, InputDependentGate):
            out[fqn] = {"keep": g.keep}
    return out


def restore_gate_settings_(model: nn.Module, settings: Mapping[str, Any], where: str) -> None:
    """Apply what `gate_settings` recorded to the rebuilt gates of ``model`` (in place).

    Raises:
        DynsparseError: a malformed entry, no gate of the right kind at its fqn, or a value the gate refuses; the
            message starts with ``where`` (the file or checkpoint) and names the gate.
    """
    from ..gate_ops import named_gates
    from ..gates import InputDependentGate, TopKGate

    gates = dict(named_gates(model))
    for fqn, entry in settings.items():
        g = gates.get(fqn)
        at = f"{where} entry {fqn!r}"
        if not isinstance(entry, dict) or set(entry) - {"k", "keep"}:
            raise DynsparseError(f"{at}: expected an object with 'k' or 'keep', got {entry!r}")
        if "k" in entry and isinstance(g, TopKGate):
            restore = functools.partial(g.set_k_, k=entry["k"])
        elif "keep" in entry and isinstance(g, InputDependentGate):
            restore = functools.partial(g.set_budget_, entry["keep"])
        else:
            raise DynsparseError(f"{at}: the rebuilt model has no gate there that takes it ({type(g).__name__})")
        try:
            restore()
        except DynsparseError as e:  # a bad k or keep (GateError, ConfigError)
            raise DynsparseError(f"{at}: {e}") from None
