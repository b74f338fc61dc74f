import numpy as np
import pytest

from cbmir.labels import (
    LabelError,
    LabelSchema,
    decode_predictions,
    predict_irma_axes,
    probabilities_from_logits,
)

CODES = [("1121-127-700-500",), ("1121-110-500-000",), ("1123-127-500-000",)]


def test_irma_schema_has_one_head_per_axis_with_the_seen_axis_codes():
    schema = LabelSchema.from_labels("irma-axes", CODES)
    assert schema.heads == {
        "technical": ("1121", "1123"),
        "directional": ("110", "127"),
        "anatomical": ("500", "700"),
        "biological": ("000", "500"),
    }
    targets = schema.targets(CODES)
    assert targets["anatomical"].tolist() == [1, 0, 0]


def test_targets_refuse_labels_outside_the_schema():
    schema = LabelSchema.from_labels("single-label", [("a",), ("b",)])
    assert schema.targets([("b",), ("a",)])["label"].tolist() == [1, 0]
    with pytest.raises(LabelError, match="'c' is not in the schema of head 'label'"):
        schema.targets([("c",)])


def test_schema_errors_name_the_problem():
    with pytest.raises(LabelError, match="at least 2"):
        LabelSchema.from_labels("single-label", [("a",), ("a",)])
    with pytest.raises(LabelError, match="exactly one label|a record has the labels"):
        LabelSchema.from_labels("single-label", [("a", "b")])
    with pytest.raises(LabelError, match="task 'regression'"):
        LabelSchema("regression", {"label": ("a", "b")})  # type: ignore[arg-type]  # the runtime check under test
    with pytest.raises(LabelError, match="contains"):
        LabelSchema.from_labels("irma-axes", [("1121-127-7**-500",)])


def test_multi_label_targets_are_a_zero_one_matrix_and_allow_no_finding():
    schema = LabelSchema.from_labels("multi-label", [("Effusion", "Mass"), (), ("Mass",)])
    matrix = schema.targets([("Effusion", "Mass"), (), ("Mass",)])["label"]
    assert matrix.tolist() == [[1, 1], [0, 0], [0, 1]]


def test_schema_round_trips_through_a_dict():
    schema = LabelSchema.from_labels("irma-axes", CODES)
    assert LabelSchema.from_dict(schema.to_dict()) == schema


def test_irma_prediction_stops_early_where_the_prefix_mass_is_low():
    schema = LabelSchema(
        "irma-axes",
        {
            "technical": ("1121", "1123"),
            "directional": ("110", "127"),
            "anatomical": ("411", "412", "500"),
            "biological": ("000", "700"),
        },
    )
    probabilities = {
        "technical": np.array([[0.9, 0.1]]),
        "directional": np.array([[0.3, 0.7]]),
        # hand (41x) holds 0.8 together, but neither finger nor middle hand reaches 0.6
        "anatomical": np.array([[0.45, 0.35, 0.2]]),
        "biological": np.array([[0.5, 0.5]]),
    }
    [(code, axes)] = predict_irma_axes(probabilities, schema, threshold=0.6)
    assert code == "1121-127-41*-***"
    assert axes["anatomical"].confidence == pytest.approx(0.8)
    [(never_stopping, _)] = predict_irma_axes(probabilities, schema, threshold=0.0)
    assert never_stopping == "1121-127-411-000"


def test_decode_predictions_per_task():
    single = LabelSchema("single-label", {"label": ("covid", "normal", "pneumonia")})
    probabilities = probabilities_from_logits(single, {"label": np.log(np.array([[0.2, 0.1, 0.7]]))})
    [prediction] = decode_predictions(single, probabilities, top=2)
    assert prediction.label == "pneumonia" and prediction.confidence == pytest.approx(0.7)
    assert [name for name, _ in prediction.top["label"]] == ["pneumonia", "covid"]

    multi = LabelSchema("multi-label", {"label": ("Effusion", "Mass")})
    probabilities = probabilities_from_logits(multi, {"label": np.array([[2.0, -3.0], [-2.0, -2.0]])})
    first, second = decode_predictions(multi, probabilities)
    assert first.label == "Effusion" and second.label == ""
