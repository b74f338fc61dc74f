"""Shared helpers of the index tests: seeded archives of random unit vectors with IRMA codes, chest labels,
findings and datasets, a reference filter written with `cbmir.irma.matches`, and brute-force checks."""

from __future__ import annotations

import hashlib
import re

import faiss
import numpy as np

from cbmir.index import Filters, Hit, ImageEntry, ModelStamp
from cbmir.index.ondisk import OnDiskIndex
from cbmir.irma import IrmaCode, matches

TEST_NET = {"architecture": {"name": "test-net"}, "created": "2024-01-01T00:00:00+00:00"}
STAMP = ModelStamp(TEST_NET, 32)  # the model of every test index: 32-d vectors
OTHER_STAMP = ModelStamp({"architecture": {"name": "other-net"}, "created": "2024-02-02T00:00:00+00:00"}, 32)
CODES = (
    "1121-127-700-500", "1121-120-913-700", "1121-115-917-700", "1123-110-411-600",
    "1121-127-920-700", "1121-120-942-700", "1123-127-500-000", "112d-121-a10-33b",
)  # fmt: skip
PARTIAL = ("1121-12*-9**-***", "1121-127-7**-5**")  # predictions that stopped early
FINDINGS = ("Effusion", "Mass", "Nodule", "Pneumothorax")
FILTERS = (
    Filters(anatomy="9"),
    Filters(anatomy="91", on="true"),
    Filters(anatomy="9", on="predicted"),
    Filters(biology="7", on="predicted"),
    Filters(technical="1121", directional="12"),
    Filters(technical="112D"),
    Filters(code="1121-127-700-500"),
    Filters(code="1121127700500", on="true"),
    Filters(dataset="chest"),
    Filters(label="effusion"),
    Filters(label="pneumonia"),
    Filters(anatomy="9", dataset="irma", label="Mass"),
    Filters(anatomy="94", biology="7", on="best", dataset="irma"),
    Filters(anatomy="z"),
)
_IRMA = re.compile(r"[^-]{4}-[^-]{3}-[^-]{3}-[^-]{3}")


def unit_vectors(count: int, dimension: int, seed: int, *, clusters: int = 0) -> np.ndarray:
    """Random unit vectors; with `clusters`, drawn around that many centres, as real embeddings are."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dimension))
    if clusters:
        centres = rng.standard_normal((clusters, dimension)) * 3
        vectors += centres[rng.integers(0, clusters, count)]
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_entries(vectors: np.ndarray, *, seed: int = 0, prefix: str = "img") -> list[ImageEntry]:
    """One entry per vector: IRMA images (true code known or not) and chest images with class labels."""
    rng = np.random.default_rng(seed)
    entries = []
    for number, vector in enumerate(vectors):
        chest = rng.random() < 0.3
        true_code: str | None
        if chest:
            true_code = str(rng.choice(["pneumonia", "normal"]))
            predicted = str(rng.choice(["pneumonia", "normal"]))
        else:
            true_code = str(rng.choice(CODES)) if rng.random() < 0.7 else None
            predicted = str(rng.choice(CODES + PARTIAL))
        findings = tuple(str(f) for f in rng.choice(FINDINGS, size=rng.integers(0, 3), replace=False))
        entries.append(
            ImageEntry(
                location=f"/archive/{prefix}/{number}.png",
                content_hash=content_hash(f"{prefix}-{number}"),
                width=int(rng.integers(100, 3000)),
                height=int(rng.integers(100, 3000)),
                dataset="chest" if chest else "irma",
                true_code=true_code,
                predicted=predicted,
                confidences={"technical": 0.9, "anatomical": float(rng.random())},
                confidence=float(rng.random()),
                labels=findings,
                extra={"source": prefix},
                embedding=vector,
            )
        )
    return entries


def passes(entry: ImageEntry, filters: Filters | None) -> bool:
    """The meaning of `Filters`, written independently of the SQL: irma.matches on the chosen code."""
    if filters is None:
        return True
    if filters.on == "true" or (filters.on == "best" and entry.true_code is not None):
        chosen = entry.true_code
    else:
        chosen = entry.predicted
    code = chosen if chosen is not None and _IRMA.fullmatch(chosen) is not None else None  # None: not IRMA
    for name, axis in (("technical", "T"), ("directional", "D"), ("anatomy", "A"), ("biology", "B")):
        prefix = getattr(filters, name)
        if prefix is not None and not (code is not None and matches(code, axis, prefix)):
            return False
    if filters.code is not None and not (code is not None and IrmaCode.parse(code) == IrmaCode.parse(filters.code)):
        return False
    if filters.dataset is not None and entry.dataset != filters.dataset:
        return False
    if filters.label is not None:
        labels = {label.lower() for label in (entry.true_code, *entry.labels) if label}
        if filters.label.lower() not in labels:
            return False
    return True


def assert_exact(hits: list[Hit], query: np.ndarray, vectors: dict[int, np.ndarray], k: int) -> None:
    """`hits` are a correct top k of `vectors` (id -> unit vector) for `query`: as many as possible, distinct,
    all candidates, best first, with the brute-force scores (ties may be broken either way)."""
    query = query / np.linalg.norm(query)
    expected = sorted((float(vector @ query) for vector in vectors.values()), reverse=True)[:k]
    got = [hit.id for hit in hits]
    assert len(got) == len(expected) == min(k, len(vectors))
    assert len(set(got)) == len(got)
    assert set(got) <= set(vectors)
    np.testing.assert_allclose([hit.score for hit in hits], expected, atol=1e-5)
    np.testing.assert_allclose([hit.score for hit in hits], [vectors[i] @ query for i in got], atol=1e-5)


def recall(hits: list[Hit], query: np.ndarray, vectors: dict[int, np.ndarray], k: int) -> float:
    ids = np.array(list(vectors), dtype=np.int64)
    scores = np.stack(list(vectors.values())) @ query
    truth = set(ids[np.argsort(-scores)[:k]].tolist())
    return len(truth & {hit.id for hit in hits}) / len(truth)


def index_ids(engine) -> set[int]:
    """The ids held by the engine's FAISS index (white box: the id map, or the IVF lists, also those of an on-disk
    index's compressed index)."""
    index = engine._vectors.index
    if index is None:
        return set()
    if isinstance(index, OnDiskIndex):
        index = faiss.extract_index_ivf(index.compressed)
    if isinstance(index, faiss.IndexIVF):
        lists = index.invlists
        return {
            int(i)
            for number in range(index.nlist)
            if lists.list_size(number)
            for i in faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number))
        }
    return set(faiss.vector_to_array(index.id_map).tolist())
