import numpy as np
import pytest

from cbmir.labels import (
    NEIGHBOUR_TEMPERATURE,
    NEIGHBOUR_WEIGHT,
    LabelError,
    LabelSchema,
    blend_with_neighbours,
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


def test_blending_adds_the_neighbours_similarity_weighted_votes_per_axis():
    schema = LabelSchema.from_labels("irma-axes", CODES)
    model = {"technical": [0.9, 0.1], "directional": [0.5, 0.5], "anatomical": [0.2, 0.8], "biological": [1.0, 0.0]}
    neighbours = [("1123-127-500-000", 0.90), ("1121-110-500-000", 0.85), ("1121-127-700-500", 0.60)]
    blended, voters = blend_with_neighbours(schema, {h: np.array(p) for h, p in model.items()}, neighbours)
    assert voters == 3 and NEIGHBOUR_WEIGHT == 0.5 and NEIGHBOUR_TEMPERATURE == 0.05
    w = np.exp(np.array([0.90, 0.85, 0.60]) / 0.05)
    w /= w.sum()  # e^0 : e^-1 : e^-6 of the best
    assert blended["technical"] == pytest.approx([0.45 + 0.5 * (w[1] + w[2]), 0.05 + 0.5 * w[0]])
    assert blended["directional"] == pytest.approx([0.25 + 0.5 * w[1], 0.25 + 0.5 * (w[0] + w[2])])
    assert blended["anatomical"] == pytest.approx([0.1 + 0.5 * (w[0] + w[1]), 0.4 + 0.5 * w[2]])
    assert blended["biological"] == pytest.approx([0.5 + 0.5 * (w[0] + w[1]), 0.5 * w[2]])
    for values in blended.values():
        assert values.sum() == pytest.approx(1.0)


def test_neighbours_vote_only_on_what_the_model_knows():
    schema = LabelSchema.from_labels("irma-axes", CODES)
    model = {head: np.full(len(classes), 1 / len(classes)) for head, classes in schema.heads.items()}
    # a code whose technical axis the model never saw, a code with '*' on the anatomical axis, a class name
    neighbours = [("1999-127-800-000", 0.9), ("1121-110-5**-500", 0.9), ("pneumonia", 0.95)]
    blended, voters = blend_with_neighbours(schema, model, neighbours)
    assert voters == 2  # the class name votes on no axis
    assert blended["technical"] == pytest.approx([0.75, 0.25])  # only the second code votes: 1121
    assert blended["anatomical"] == pytest.approx([0.5, 0.5])  # 800 unknown, 5** not known to the end: no vote
    assert blended["directional"] == pytest.approx([0.5, 0.5])  # 127 and 110, equally similar
    assert blend_with_neighbours(schema, model, [])[1] == 0


def test_class_labels_blend_and_findings_never_do():
    schema = LabelSchema("single-label", {"label": ("normal", "pneumonia")})
    blended, voters = blend_with_neighbours(schema, {"label": np.array([0.8, 0.2])}, [("pneumonia", 0.7)])
    assert voters == 1 and blended["label"] == pytest.approx([0.4, 0.6])
    findings = LabelSchema("multi-label", {"label": ("effusion", "mass")})
    untouched, voters = blend_with_neighbours(findings, {"label": np.array([0.8, 0.2])}, [("mass", 0.9)])
    assert voters == 0 and untouched["label"] == pytest.approx([0.8, 0.2])
