"""AP, BWT, FWT and forgetting against hand-computed values."""

import pytest

from ivtrainer.continual.metrics import continual_scores


def test_scores_of_a_three_task_matrix():
    matrix = [
        [0.1, 0.0, 0.2],  # before training
        [0.9, 0.1, 0.2],  # after task 0
        [0.6, 0.8, 0.4],  # after task 1
        [0.5, 0.7, 0.9],  # after task 2
    ]
    scores = continual_scores(matrix)
    assert scores["AP"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert scores["BWT"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert scores["FWT"] == pytest.approx(((0.1 - 0.0) + (0.4 - 0.2)) / 2)
    assert scores["forgetting"] == pytest.approx([0.9 - 0.5, 0.8 - 0.7])


def test_one_task_has_no_transfer():
    assert continual_scores([[0.0], [0.8]]) == {"AP": 0.8, "BWT": 0.0, "FWT": 0.0, "forgetting": []}


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        ([[0.1, 0.2], [0.3, 0.4]], "T \\+ 1 rows"),
        ([], "T \\+ 1 rows"),
        ([[0.1], [float("nan")]], "non-finite"),
    ],
)
def test_a_malformed_matrix_is_refused(matrix, match):
    with pytest.raises(ValueError, match=match):
        continual_scores(matrix)
