"""Demo metrics: cosines and nearest-neighbour agreement."""

import numpy as np
import pytest

from lrcompile.demo import metrics


def test_cosines():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(metrics.cosines(a, b), [1.0, -1.0, np.sqrt(0.5)])


def test_neighbours_exclude_self_and_agreement_counts():
    a = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert metrics.nearest_neighbours(a).tolist() == [1, 0, 3, 2]
    b = a.copy()
    b[1] = [0.2, 0.8]  # row 1 moves next to row 3; row 3 still sits closest to row 2
    assert metrics.nearest_neighbours(b).tolist() == [1, 3, 3, 2]
    assert metrics.neighbour_agreement(a, b) == pytest.approx(3 / 4)
