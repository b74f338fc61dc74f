"""The training losses of cbmir.train.objective, against sums written out here with numpy and against the
error score of cbmir.irma."""

import numpy as np
import pytest
import torch

from cbmir.irma import AXES, CodeTables, error_score
from cbmir.labels import LabelSchema
from cbmir.models import ModelOutput
from cbmir.train import make_config
from cbmir.train.objective import Objective, axis_costs

# Every axis: 1 -> 10, 11, 12, 13; 2; 3; and 0 at the top (as in tests/test_irma.py).
TREE = "0;unspecified\n1;alpha\n10;unspecified\n11;alpha one\n12;alpha two\n13;alpha three\n2;beta\n3;gamma\n"
CODES = ["1100-110-110-110", "1100-120-110-110", "1100-200-130-110", "1200-110-300-200"]


@pytest.fixture
def tables(tmp_path) -> CodeTables:
    for name in ("A.csv", "B.csv", "C.csv", "D.csv"):
        (tmp_path / name).write_text(TREE)
    return CodeTables.load(tmp_path)


def test_axis_costs_are_the_error_score_of_codes_apart_on_that_axis_only(tables):
    schema = LabelSchema.from_labels("irma-axes", [(code,) for code in CODES])
    costs = axis_costs(schema, tables)
    assert schema.heads["directional"] == ("110", "120", "200")
    # 110 vs 120: wrong from position 2 -> (1/8 + 1/3) / (1/4 + 1/8 + 1/3) = 11/17 (of an axis's worst)
    assert costs["directional"][0, 1] == pytest.approx(11 / 17)
    assert costs["directional"][0, 2] == pytest.approx(1.0)  # wrong from the first position
    for axis, matrix in costs.items():
        assert np.all(np.diag(matrix) == 0)
        position = AXES.index(axis)
        for i, true_value in enumerate(schema.heads[axis]):
            for j, guess_value in enumerate(schema.heads[axis]):
                true, guess = ["1100", "110", "110", "110"], ["1100", "110", "110", "110"]
                true[position], guess[position] = true_value, guess_value
                expected = 4 * error_score("-".join(true), "-".join(guess), tables)  # 0.25 per axis at worst
                assert matrix[i, j] == pytest.approx(expected)


def test_the_hierarchy_weight_adds_the_expected_error_of_each_head(tables):
    schema = LabelSchema.from_labels("irma-axes", [(code,) for code in CODES])
    targets = schema.targets([(code,) for code in CODES])
    groups = np.arange(len(CODES))
    generator = torch.Generator().manual_seed(0)
    logits = {axis: torch.randn(len(CODES), size, generator=generator) for axis, size in schema.head_sizes.items()}
    output = ModelOutput(logits, torch.randn(len(CODES), 8, generator=generator), torch.zeros(len(CODES), 8))
    rows = np.arange(len(CODES))
    costs = axis_costs(schema, tables)

    def loss(weight: float) -> float:
        config = make_config(hierarchy_weight=weight, contrastive_weight=0.0, class_balance="none")
        return float(Objective(schema, targets, groups, config, costs).loss(output, rows, train=True))

    expected = 0.0
    for axis, values in logits.items():
        probabilities = values.softmax(1).numpy()
        expected += np.mean([probabilities[row] @ costs[axis][targets[axis][row]] for row in rows])
    assert loss(0.5) - loss(0.0) == pytest.approx(0.5 * expected, rel=1e-5)
    config = make_config(hierarchy_weight=0.5, contrastive_weight=0.0, class_balance="none")
    validation = Objective(schema, targets, groups, config, costs).loss(output, rows, train=False)
    assert float(validation) == pytest.approx(loss(0.0), rel=1e-6)  # validation: the classification loss only
