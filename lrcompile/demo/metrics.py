"""Embedding-quality metrics for the demo and the accuracy benchmark: plain numerics."""

from __future__ import annotations

import numpy as np


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each candidate embedding (row) with its reference."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return np.sum(ref * cand, axis=1) / np.where(norms == 0, 1.0, norms)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """For each row, the index of its most cosine-similar OTHER row."""
    unit = np.asarray(embeddings, dtype=np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)  # a sentence is not its own neighbour
    return np.argmax(similarity, axis=1)


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of rows whose nearest other row is the same under both embeddings."""
    return float(np.mean(nearest_neighbours(reference) == nearest_neighbours(candidate)))
