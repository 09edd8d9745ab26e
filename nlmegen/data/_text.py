"""Free text as a covariate: a numeric embedding of a text column, offline.

The default embedding is latent semantic analysis: TF-IDF of word unigrams and bigrams followed by
a truncated SVD (Deerwester et al. 1990), fitted on the data's own notes with NumPy alone, so it
needs no model download. Any other embedding (e.g. a sentence-transformer the user has locally) is
a function ``texts -> [n, k] array`` passed as ``embed=``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .._errors import DataError

__all__ = ["TextEmbedding"]

_TOKEN = re.compile(r"[a-z0-9]+")


def _tokens(text: str, ngrams: int) -> list[str]:
    words = _TOKEN.findall(str(text).lower())
    out = list(words)
    for n in range(2, ngrams + 1):
        out += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    return out


@dataclass
class TextEmbedding:
    """A text column -> ``n_components`` numeric covariates, one set per subject.

    Parameters
    ----------
    n_components
        Embedding dimension (number of covariate columns added).
    embed
        None: TF-IDF + truncated SVD fitted on the texts given to :meth:`fit`. Otherwise a function
        mapping a list of ``n`` strings to an ``[n, k]`` array (any ``k``; ``n_components`` is then
        ignored), e.g. ``lambda t: sentence_model.encode(t)``.
    ngrams, min_df
        Longest word n-gram, and the fewest notes a term must occur in to count.
    standardize
        Centre and scale each component to unit variance over the fitted notes (good network inputs).

    Examples
    --------
    >>> import nlmegen
    >>> notes = ["responder genotype, feels well", "non-responder genotype", "responder, mild nausea",
    ...          "non-responder; no change", "responder genotype"]
    >>> emb = nlmegen.TextEmbedding(n_components=2).fit(notes)
    >>> emb.transform(notes).shape
    (5, 2)
    """

    n_components: int = 4
    embed: Callable[[list[str]], np.ndarray] | None = None
    ngrams: int = 2
    min_df: int = 1
    standardize: bool = True
    vocabulary: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    idf: np.ndarray | None = field(default=None, init=False, repr=False)
    components: np.ndarray | None = field(default=None, init=False, repr=False)
    center: np.ndarray | None = field(default=None, init=False, repr=False)
    scale: np.ndarray | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------ fitting
    def fit(self, texts: Sequence[str]) -> TextEmbedding:
        """Learn the vocabulary, IDF weights and SVD projection (and the standardisation) from ``texts``."""
        texts = _as_texts(texts)
        if self.embed is None:
            if self.n_components < 1:
                raise ValueError(f"n_components must be positive, not {self.n_components}")
            df = Counter(t for text in texts for t in set(_tokens(text, self.ngrams)))
            terms = sorted(t for t, c in df.items() if c >= self.min_df)
            if not terms:
                raise DataError("text embedding: no term occurs in at least min_df notes")
            self.vocabulary = {t: i for i, t in enumerate(terms)}
            n = len(texts)
            # smoothed IDF, as scikit-learn's TfidfVectorizer: log((1 + n) / (1 + df)) + 1
            self.idf = np.log((1.0 + n) / (1.0 + np.array([df[t] for t in terms], float))) + 1.0
            _, _, vt = np.linalg.svd(self._tfidf(texts), full_matrices=False)
            k = min(self.n_components, vt.shape[0])
            comps = vt[:k]
            # a deterministic sign: the largest loading of each component is positive
            signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
            self.components = comps * signs[:, None]
        raw = self._raw(texts)
        if self.standardize:
            self.center = raw.mean(axis=0)
            sd = raw.std(axis=0)
            self.scale = np.where(sd > 1e-12, sd, 1.0)
        return self

    def _tfidf(self, texts: list[str]) -> np.ndarray:
        m = np.zeros((len(texts), len(self.vocabulary)))
        for i, text in enumerate(texts):
            for t, c in Counter(_tokens(text, self.ngrams)).items():
                j = self.vocabulary.get(t)
                if j is not None:
                    m[i, j] = c
        m = m * self.idf
        norm = np.linalg.norm(m, axis=1, keepdims=True)
        return m / np.where(norm > 0, norm, 1.0)

    def _raw(self, texts: list[str]) -> np.ndarray:
        if self.embed is not None:
            out = np.asarray(self.embed(list(texts)), dtype=float)
            if out.ndim != 2 or out.shape[0] != len(texts):
                raise DataError(f"the embed function returned shape {out.shape}; expected [{len(texts)}, k]")
            return out
        if self.components is None:
            raise RuntimeError("TextEmbedding: call fit(texts) first")
        return self._tfidf(texts) @ self.components.T

    # ------------------------------------------------------------------ use
    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, k]`` embedding of ``texts`` (new notes use the fitted vocabulary and projection)."""
        raw = self._raw(_as_texts(texts))
        if self.standardize:
            if self.center is None:
                raise RuntimeError("TextEmbedding: call fit(texts) first")
            raw = (raw - self.center) / self.scale
        if not np.all(np.isfinite(raw)):
            raise DataError("text embedding: non-finite values (check the embed function)")
        return raw

    def fit_table(self, table: pd.DataFrame, column: str, *, id_column: str = "ID") -> TextEmbedding:
        """:meth:`fit` on the one note per subject of ``table[column]`` (see :meth:`add_to`)."""
        return self.fit(_subject_notes(table, column, id_column).to_list())

    def add_to(self, table: pd.DataFrame, column: str, *, id_column: str = "ID",
               prefix: str | None = None) -> pd.DataFrame:
        """``table`` with the text column replaced by ``k`` numeric covariates ``<prefix>0 ...``.

        Each subject's note is its first non-empty value of ``column``; the covariates are constant
        per subject, so they reach the model as ``pop.covariates["<prefix>0"]`` etc.
        """
        notes = _subject_notes(table, column, id_column)
        values = self.transform(notes.to_list())
        prefix = f"{column}_" if prefix is None else prefix
        cols = [f"{prefix}{k}" for k in range(values.shape[1])]
        clash = [c for c in cols if c in table.columns]
        if clash:
            raise DataError(f"text embedding: columns {clash} already exist; choose another prefix")
        per_subject = pd.DataFrame(values, index=notes.index, columns=cols)
        out = table.drop(columns=[column]).copy()
        mapped = per_subject.reindex(_id_values(table, id_column))
        for c in cols:
            out[c] = mapped[c].to_numpy()
        return out


def _as_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise DataError("give a sequence of notes, not one string")
    out = ["" if (t is None or (isinstance(t, float) and np.isnan(t))) else str(t) for t in texts]
    if not out:
        raise DataError("text embedding: no notes")
    return out


def _id_values(table: pd.DataFrame, id_column: str):
    cols = {c.upper(): c for c in table.columns}
    if id_column.upper() not in cols:
        raise DataError(f"text embedding: no {id_column!r} column")
    return table[cols[id_column.upper()]].to_numpy()


def _subject_notes(table: pd.DataFrame, column: str, id_column: str) -> pd.Series:
    if column not in table.columns:
        raise DataError(f"text embedding: no column {column!r}; columns are {list(table.columns)}")
    ids = _id_values(table, id_column)
    text = table[column].astype("string").fillna("").str.strip()
    frame = pd.DataFrame({"ID": ids, "text": text.to_numpy()})
    notes = frame[frame["text"] != ""].groupby("ID", sort=False)["text"].first()
    return notes.reindex(pd.unique(ids), fill_value="")
