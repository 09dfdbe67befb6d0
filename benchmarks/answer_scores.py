"""How the answer-quality benchmarks score a ranked answer: by class label (a result is
relevant when it shares the query's label), precision@10 and average precision over the first
100 results, divided by ``min(relevant in the catalogue, 100)`` (its mean is mAP@100); and the
exact answers to score against (brute-force inner product)."""

from __future__ import annotations

import numpy as np

K = 10
DEPTH = 100  # results per HTTP query: mAP@100


def precision_at(labels: list[str], query: str, k: int = K) -> float:
    return sum(label == query for label in labels[:k]) / k


def average_precision(labels: list[str], query: str, relevant: int, depth: int = DEPTH) -> float:
    hits, total = 0, 0.0
    for i, label in enumerate(labels[:depth], 1):
        if label == query:
            hits += 1
            total += hits / i
    return total / max(1, min(relevant, depth))


def mean(values, digits: int) -> float:
    return round(float(np.mean(values)), digits)


def scores_of(answers: list[list[str]], queries: list[str], relevant: dict[str, int]) -> dict:
    """P@10 and mAP@100 of ranked label lists."""
    pairs = list(zip(answers, queries, strict=True))
    return {
        "precision_at_10": mean([precision_at(a, q) for a, q in pairs], 4),
        "map_at_100": mean([average_precision(a, q, relevant[q]) for a, q in pairs], 4),
    }


def exact_labels(queries, vectors, labels: list[str], depth: int = DEPTH) -> list[list[str]]:
    scores = queries @ vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return [[labels[j] for j in row] for row in top]
