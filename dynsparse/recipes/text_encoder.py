"""The encoder of a sentence-embedding recipe: loading it (a registered name or a directory), the token lengths it
can take, and the ``data`` description its model files record (used by `dynsparse.recipes.text`)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .schema import RecipeError
from .text_schema import EncoderSpec, TextRecipe

__all__ = ["check_lengths", "load_encoder", "text_data_spec"]


def load_encoder(spec: EncoderSpec) -> tuple[nn.Module, Any]:
    """The dense transformers ``BertModel`` (eval mode, float32) and its tokenizer, from a registered name or a
    directory.

    A directory's weights load in float32 whatever dtype they were saved in (transformers would keep a half-precision
    checkpoint in half precision; the recipe trains the weights and gates in float32).

    Raises:
        RecipeError: the directory holds no transformers config or another model than BERT (the FLOPs attribution is
            BERT's), checked before its weights load; or its tokenizer does not fit the model.
    """
    try:
        import transformers
    except ImportError:
        raise RecipeError(
            "encoder: a sentence-embedding recipe needs transformers: pip install 'dynsparse[hf]'"
        ) from None
    if spec.pretrained is not None:
        from ..pretrained import load_pretrained

        enc = load_pretrained(spec.pretrained)
        model, tok = enc.model, enc.tokenizer
    else:
        path = os.path.expanduser(spec.path)  # as text_schema checks it
        _check_bert_dir(transformers, path, spec.path)
        model = transformers.AutoModel.from_pretrained(
            path, local_files_only=True, add_pooling_layer=False, dtype=torch.float32
        )
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        # a directory without vocab.txt / tokenizer.json still gives a tokenizer: its 5 special tokens, every word
        # [UNK]; a vocabulary larger than the embeddings would index past them
        if vocab and not vocab // 2 <= len(tok) <= vocab:
            raise RecipeError(
                f"encoder.path: the tokenizer in {spec.path} has {len(tok)} tokens, the model's embeddings "
                f"{vocab} (config.vocab_size): its vocab.txt / tokenizer.json are missing or belong to another model"
            )
    if not isinstance(model, transformers.BertModel):
        raise RecipeError(f"encoder: {type(model).__name__} is not a BertModel; the recipe compresses BERT encoders")
    return model.eval(), tok


def _check_bert_dir(transformers: Any, path: str, shown: str) -> None:
    """Refuse a directory without a transformers config, or with another model type than BERT, naming the field
    (transformers failed with a ValueError, or a TypeError for the ``add_pooling_layer`` BERT takes)."""
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise RecipeError(f"encoder.path: {shown} holds no transformers config (config.json) of a BERT: {e}") from None
    if config.model_type != "bert":
        raise RecipeError(
            f"encoder.path: {shown} holds a {config.model_type!r} model, not a BERT encoder (BertModel); the recipe "
            f"compresses BERT encoders"
        )


def check_lengths(recipe: TextRecipe, encoder: nn.Module) -> None:
    """Refuse token lengths the encoder has no position embeddings for (before any training, not at the evaluation).

    Raises:
        RecipeError: ``data.max_length``, ``evaluate.max_length`` or ``budget.flops_tokens`` exceeds the encoder's
            ``max_position_embeddings`` (the message names the field).
    """
    limit = getattr(encoder.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for key, n in (
        ("data.max_length", recipe.data.max_length),
        ("evaluate.max_length", recipe.evaluate.max_length),
        ("budget.flops_tokens", recipe.budget.flops_tokens),
    ):
        if n > limit:
            raise RecipeError(
                f"{key}: {n} tokens, but the encoder has position embeddings for {limit} "
                f"(config.max_position_embeddings); use at most {limit}"
            )


def text_data_spec(recipe: TextRecipe) -> dict[str, Any]:
    """The ``data`` metadata of a sentence-embedding run's model files (`dynsparse.convert.io.TEXT_DATA_FIELDS`).

    ``distill``: the text sets the encoder was distilled on; ``max_length``: the tokens per sentence it was trained
    at; ``tokenizer``: where its tokenizer comes from, the registered encoder name or the directory as the recipe
    gives it (the model files hold no tokenizer).
    """
    return {
        "distill": list(recipe.data.distill),
        "max_length": recipe.data.max_length,
        "tokenizer": recipe.encoder.pretrained or recipe.encoder.path,
    }
