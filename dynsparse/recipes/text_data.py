"""Text of a sentence-embedding recipe: tokenize, pad, an endless, resumable stream of batches, and the tokenized
data of a recipe (`prepare_text_data`).

`BatchStream` draws exactly the batches of the generator that ``benchmarks/minilm_compress.py`` used for its
recorded runs (same seed, same order), and its position can be saved and restored (`state_dict`), so a run
resumed from a checkpoint sees the same batches as one that was never stopped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .schema import RecipeError
from .text_schema import TextRecipe

__all__ = ["BatchStream", "TextData", "collate", "prepare_text_data", "tokenize"]


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (with the special tokens), truncated to ``max_length``; no padding."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(seqs: Sequence[Sequence[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists to one batch.

    Returns:
        ``input_ids`` ``(B, N)`` (``pad`` after each sequence) and ``attention_mask`` ``(B, N)`` (1 on real tokens),
        ``N`` the longest sequence.
    """
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


class BatchStream:
    """Endless shuffled batches of ``batch_size`` sequences; sentences of similar length are batched together.

    Each pass shuffles the sequences, sorts every chunk of 50 batches by length, cuts it into batches, shuffles
    the batches and yields the full ones. The random state is ``random.Random(seed)``, separate from torch's.

    Args:
        seqs: Token id lists.
        batch_size: Sequences per batch.
        seed: Seed of the shuffles.

    Examples:
        >>> stream = BatchStream([[1, 5, 2], [1, 6, 7, 2], [1, 2]], batch_size=2)
        >>> ids, mask = next(stream)
        >>> ids.shape[0]
        2
    """

    def __init__(self, seqs: Sequence[Sequence[int]], batch_size: int, seed: int = 0) -> None:
        if len(seqs) < batch_size:
            raise ValueError(f"BatchStream: {len(seqs)} sequences make no batch of {batch_size}")
        self.seqs, self.batch_size = seqs, batch_size
        self.rng = random.Random(seed)
        self.groups: list[list[int]] = []
        self.pos = 0

    def _new_pass(self) -> None:
        order = list(range(len(self.seqs)))
        self.rng.shuffle(order)
        chunk = 50 * self.batch_size
        groups = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: len(self.seqs[i]))
            groups += [part[b : b + self.batch_size] for b in range(0, len(part), self.batch_size)]
        self.rng.shuffle(groups)
        self.groups, self.pos = groups, 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        """The next ``(input_ids, attention_mask)``, each ``(batch_size, N)``."""
        while True:
            if self.pos >= len(self.groups):
                self._new_pass()
            g = self.groups[self.pos]
            self.pos += 1
            if len(g) == self.batch_size:
                return collate([self.seqs[i] for i in g])

    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists and ints) of the position in the stream, for a checkpoint."""
        version, state, gauss = self.rng.getstate()
        return {"rng": [version, list(state), gauss], "groups": self.groups, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict` (same sequences, batch size)."""
        version, rng, gauss = state["rng"]
        self.rng.setstate((version, tuple(rng), gauss))
        self.groups = [list(g) for g in state["groups"]]
        self.pos = int(state["pos"])


@dataclass
class TextData:
    """Tokenized text of a recipe: distillation sequences, held-out sentences, the probe, the FLOPs example."""

    train: list[list[int]]
    held: list[list[int]]
    probe_train: list[list[int]]
    probe_train_y: list[int]
    probe_test: list[list[int]]
    probe_test_y: list[int]
    example: tuple[Tensor, Tensor]


def prepare_text_data(recipe: TextRecipe, tokenizer: Any) -> TextData:
    """Load and tokenize the recipe's text (`dynsparse.data.text`); subsets are fixed by ``recipe.seed``.

    Raises:
        RecipeError: the held-out text is too short for the FLOPs example of ``budget.flops_tokens`` tokens, or
            the probe's training texts (``evaluate.probe_train``) hold one class only.
    """
    from ..data.text import load_text

    d, ev = recipe.data, recipe.evaluate
    texts = [t for name in d.distill for t in load_text(name, "train").texts]
    if d.train_subset is not None and d.train_subset < len(texts):
        pick = list(range(len(texts)))
        random.Random(recipe.seed).shuffle(pick)
        texts = [texts[i] for i in sorted(pick[: d.train_subset])]
    train = tokenize(tokenizer, texts, d.max_length)
    held = list(load_text(ev.held_out, "test").texts)
    random.Random(recipe.seed).shuffle(held)
    held_seqs = tokenize(tokenizer, held[: ev.sentences], ev.max_length)
    p_train, y_train, p_test, y_test = [], [], [], []
    if ev.probe is not None:
        tr, te = load_text(ev.probe, "train"), load_text(ev.probe, "test")
        pick = list(range(len(tr)))
        random.Random(recipe.seed).shuffle(pick)
        pick = sorted(pick[: ev.probe_train]) if ev.probe_train else pick
        n_test = ev.probe_test or len(te)
        p_train = tokenize(tokenizer, [tr.texts[i] for i in pick], ev.max_length)
        y_train = [tr.labels[i] for i in pick]
        _check_probe_classes(y_train, ev.probe)
        p_test, y_test = tokenize(tokenizer, te.texts[:n_test], ev.max_length), list(te.labels[:n_test])
    n = recipe.budget.flops_tokens
    ids = torch.tensor([tokenize(tokenizer, [" ".join(held[-200:])], n)[0]])
    if ids.shape != (1, n):
        raise RecipeError(f"budget.flops_tokens: the held-out text gives {ids.shape[1]} tokens, not {n}")
    return TextData(train, held_seqs, p_train, y_train, p_test, y_test, (ids, torch.ones_like(ids)))


def _check_probe_classes(labels: Sequence[int], name: str) -> None:
    """Refuse probe training labels of one class (before training: the logistic regression needs two)."""
    if len(set(labels)) < 2:
        raise RecipeError(
            f"evaluate.probe_train: the {len(labels)} probe training text(s) of {name!r} are all of one class; the "
            f"logistic-regression probe needs two: use more (0 = all) or probe: null"
        )
