"""Tests of cbmir.metrics: hand-computed figures, edge cases, agreement with scikit-learn, IRMA accuracies and
error score (real tables from the shared data folder, skipped with a reason when absent), report files and
plots."""

import json
from fractions import Fraction

import numpy as np
import pytest
from sklearn import metrics as skm

from cbmir.errors import CbmirError
from cbmir.irma import CodeTables
from cbmir.metrics import (
    FIGURES,
    IRMA_TABLES_NOTE,
    MetricsError,
    classification_report,
    irma_report,
    multilabel_report,
    plot_confusion_matrix,
    plot_history,
    write_report,
)
from tests.conftest import shared_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Three classes, ten images.
#                 true:  0  0  0  0  1  1  1  2  2  2
#            predicted:  0  0  0  1  1  2  2  2  2  0
# confusion matrix (rows true, columns predicted):
#   normal     [3, 1, 0]
#   pneumonia  [0, 1, 2]
#   covid      [1, 0, 2]
CLASSES = ["normal", "pneumonia", "covid"]
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])


@pytest.fixture(scope="module")
def three_class() -> dict:
    return classification_report(Y_TRUE, Y_PRED, CLASSES)


def test_accuracy_and_confusion_matrix(three_class):
    assert three_class["kind"] == "classification"
    assert three_class["n"] == 10
    assert three_class["confusion_matrix"] == [[3, 1, 0], [0, 1, 2], [1, 0, 2]]
    assert three_class["accuracy"] == pytest.approx(6 / 10)  # diagonal 3 + 1 + 2


def test_per_class_figures_by_hand(three_class):
    per_class = three_class["per_class"]
    # normal: TP 3, FN 1 (row 0 rest), FP 1 (column 0 rest), TN 10 - 5 = 5
    assert per_class["normal"] == pytest.approx(
        {
            "sensitivity": 3 / 4,
            "specificity": 5 / 6,
            "ppv": 3 / 4,
            "npv": 5 / 6,
            "precision": 3 / 4,
            "recall": 3 / 4,
            "f1": 6 / 8,  # 2TP / (2TP + FP + FN) = 6 / 8
            "prevalence": 4 / 10,
            "detection_rate": 3 / 10,
            "detection_prevalence": 4 / 10,
            "balanced_accuracy": (3 / 4 + 5 / 6) / 2,
            "support": 4,
        }
    )
    # pneumonia: TP 1, FN 2, FP 1, TN 6
    assert per_class["pneumonia"] == pytest.approx(
        {
            "sensitivity": 1 / 3,
            "specificity": 6 / 7,
            "ppv": 1 / 2,
            "npv": 6 / 8,
            "precision": 1 / 2,
            "recall": 1 / 3,
            "f1": 2 / 5,  # 2 / (2 + 1 + 2)
            "prevalence": 3 / 10,
            "detection_rate": 1 / 10,
            "detection_prevalence": 2 / 10,
            "balanced_accuracy": 25 / 42,
            "support": 3,  # (7/21 + 18/21) / 2
        }
    )
    # covid: TP 2, FN 1, FP 2, TN 5
    assert per_class["covid"] == pytest.approx(
        {
            "sensitivity": 2 / 3,
            "specificity": 5 / 7,
            "ppv": 2 / 4,
            "npv": 5 / 6,
            "precision": 2 / 4,
            "recall": 2 / 3,
            "f1": 4 / 7,  # 4 / (4 + 2 + 1)
            "prevalence": 3 / 10,
            "detection_rate": 2 / 10,
            "detection_prevalence": 4 / 10,
            "balanced_accuracy": 29 / 42,
            "support": 3,  # (14/21 + 15/21) / 2
        }
    )


def test_macro_and_weighted_averages_by_hand(three_class):
    macro, weighted = three_class["averages"]["macro"], three_class["averages"]["weighted"]
    # macro sensitivity (3/4 + 1/3 + 2/3) / 3 = 7/12; weighted (4 * 3/4 + 3 * 1/3 + 3 * 2/3) / 10 = 6/10,
    # which is the accuracy, as weighted recall always is
    assert macro["sensitivity"] == pytest.approx(7 / 12)
    assert weighted["sensitivity"] == pytest.approx(three_class["accuracy"])
    # macro PPV (3/4 + 1/2 + 1/2) / 3 = 7/12; weighted (4 * 3/4 + 3 * 1/2 + 3 * 1/2) / 10 = 6/10
    assert macro["ppv"] == pytest.approx(7 / 12)
    assert weighted["ppv"] == pytest.approx(6 / 10)
    # macro F1 (3/4 + 2/5 + 4/7) / 3 = (105 + 56 + 80) / 420 = 241/420
    assert macro["f1"] == pytest.approx(241 / 420)
    assert macro["support"] == weighted["support"] == 10
    assert set(macro) == set(FIGURES) | {"support"}


def test_agrees_with_scikit_learn():
    rng = np.random.default_rng(7)
    y_true, y_pred = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    report = classification_report(y_true, y_pred, list("abcde"))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=range(5))
    for index, name in enumerate("abcde"):
        row = report["per_class"][name]
        expected = (precision[index], recall[index], f1[index])
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(expected)
        assert row["support"] == support[index]
    for average in ("macro", "weighted"):
        expected = skm.precision_recall_fscore_support(y_true, y_pred, average=average)[:3]
        row = report["averages"][average]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(expected)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert report["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()
    assert report["per_class"]["c"]["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y_true == 2, y_pred == 2)
    )


def test_log_loss_by_hand_and_against_scikit_learn():
    probabilities = np.array([[0.5, 0.25, 0.25], [0.2, 0.8, 0.0], [0.1, 0.1, 0.8]])
    report = classification_report(np.array([0, 1, 2]), np.array([0, 1, 2]), CLASSES, probabilities)
    # -(ln 0.5 + ln 0.8 + ln 0.8) / 3
    assert report["log_loss"] == pytest.approx(-(np.log(0.5) + 2 * np.log(0.8)) / 3)
    assert report["log_loss"] == pytest.approx(skm.log_loss([0, 1, 2], probabilities))
    assert "log_loss" not in classification_report(np.array([0]), np.array([0]), CLASSES)


def test_certain_mistake_has_a_finite_log_loss():
    report = classification_report(np.array([0]), np.array([1]), ["a", "b"], np.array([[0.0, 1.0]]))
    assert report["log_loss"] == pytest.approx(-np.log(np.finfo(np.float64).eps))


def test_class_never_predicted_and_class_absent():
    # true: a a b b c; predicted: a a b a b. c is present but never predicted, d is absent and never predicted.
    report = classification_report(np.array([0, 0, 1, 1, 2]), np.array([0, 0, 1, 0, 1]), list("abcd"))
    c, d = report["per_class"]["c"], report["per_class"]["d"]
    # c: TP 0, FN 1, FP 0, TN 4
    assert c["sensitivity"] == 0 and c["specificity"] == 1 and c["f1"] == 0
    assert c["ppv"] is None and c["precision"] is None and c["detection_prevalence"] == 0
    # d: TP 0, FN 0, FP 0, TN 5
    assert d["sensitivity"] is d["recall"] is d["ppv"] is d["f1"] is d["balanced_accuracy"] is None
    assert (d["specificity"], d["npv"], d["prevalence"], d["support"]) == (1, 1, 0, 0)
    # macro PPV skips c and d: a = 2/3 (TP 2, FP 1), b = 1/2 (TP 1, FP 1) -> 7/12
    assert report["averages"]["macro"]["ppv"] == pytest.approx(7 / 12)
    # weighted sensitivity skips d (support 0 anyway): (2 * 1 + 2 * 1/2 + 1 * 0) / 5 = 3/5
    assert report["averages"]["weighted"]["sensitivity"] == pytest.approx(3 / 5)
    text = json.dumps(report, allow_nan=False)  # no NaN anywhere
    assert "NaN" not in text


def test_class_predicted_but_absent():
    report = classification_report(np.array([0, 0]), np.array([0, 1]), ["a", "b"])
    b = report["per_class"]["b"]  # TP 0, FN 0, FP 1, TN 1
    assert b["recall"] is None and b["ppv"] == 0 and b["f1"] == 0 and b["specificity"] == 0.5


@pytest.mark.parametrize(
    ("y_true", "y_pred", "classes", "probabilities", "message"),
    [
        (np.array([0, 1]), np.array([0]), CLASSES, None, "y_true has 2 labels but y_pred has 1"),
        (np.array([0, 3]), np.array([0, 1]), CLASSES, None, "y_true[1] is 3, outside the class indices 0..2"),
        (np.array([0, -1]), np.array([0, 1]), CLASSES, None, "y_true[1] is -1"),
        (np.array([], dtype=int), np.array([], dtype=int), CLASSES, None, "y_true is empty"),
        (np.array([[0, 1]]), np.array([0, 1]), CLASSES, None, "y_true must be one-dimensional"),
        (np.array([0.0, 1.0]), np.array([0, 1]), CLASSES, None, "integer class indices, got dtype float64"),
        (np.array([0]), np.array([0]), [], None, "no classes given"),
        (np.array([0]), np.array([0]), ["a", "a"], None, "'a' repeat"),
        (np.array([0]), np.array([0]), CLASSES, np.array([[1.0, 0.0]]), "probabilities must have shape (1, 3)"),
        (np.array([0]), np.array([0]), CLASSES, np.array([[2.0, 1.0, 0.0]]), "between 0 and 1"),
        (np.array([0]), np.array([0]), CLASSES, np.array([[0.5, 0.2, 0.2]]), "row 0 sums to 0.9"),
        (np.array([0]), np.array([0]), CLASSES, np.array([[np.nan, 0.5, 0.5]]), "probabilities[0, 0] is nan"),
    ],
)
def test_bad_classification_input(y_true, y_pred, classes, probabilities, message):
    with pytest.raises(MetricsError) as caught:
        classification_report(y_true, y_pred, classes, probabilities)
    assert message in str(caught.value)
    assert isinstance(caught.value, CbmirError)


# --- multi-label -----------------------------------------------------------------------------------------

# Two findings, four images.
ML_TRUE = np.array([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=bool)
ML_SCORES = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1], [0.1, 0.3]])


def test_multilabel_by_hand():
    report = multilabel_report(ML_TRUE, ML_SCORES, ["effusion", "mass"], threshold=0.5)
    effusion, mass = report["per_class"]["effusion"], report["per_class"]["mass"]
    # effusion: positives score 0.9, 0.4; negatives 0.6, 0.1. Positive above negative in 3 of 4 pairs
    # (0.9 > 0.6, 0.9 > 0.1, 0.4 > 0.1; not 0.4 > 0.6) -> AUC 3/4.
    assert effusion["roc_auc"] == pytest.approx(3 / 4)
    # ranked 0.9 (+), 0.6 (-), 0.4 (+), 0.1 (-): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert effusion["average_precision"] == pytest.approx(5 / 6)
    # at 0.5 predicted: images 0 and 2 -> TP 1, FP 1, FN 1, TN 1
    assert (effusion["sensitivity"], effusion["ppv"], effusion["specificity"]) == (0.5, 0.5, 0.5)
    assert effusion["support"] == 2
    # mass has no positive: AUC and AP are undefined; one false positive (0.7) of 4 negatives
    assert mass["roc_auc"] is None and mass["average_precision"] is None and mass["sensitivity"] is None
    assert mass["specificity"] == pytest.approx(3 / 4)
    # macro averages skip the undefined: AUC only from effusion; specificity (1/2 + 3/4) / 2
    macro = report["averages"]["macro"]
    assert macro["roc_auc"] == pytest.approx(3 / 4) and macro["specificity"] == pytest.approx(5 / 8)
    assert list(report["averages"]) == ["macro"]
    assert report["kind"] == "multilabel" and report["n"] == 4 and report["threshold"] == 0.5


def test_multilabel_agrees_with_scikit_learn_including_ties():
    rng = np.random.default_rng(3)
    truth = rng.random((300, 4)) < [0.1, 0.3, 0.5, 0.02]
    scores = np.round(np.clip(truth * 0.3 + rng.random((300, 4)) * 0.8, 0, 1), 1)  # rounding makes ties
    report = multilabel_report(truth.astype(int), scores, ["a", "b", "c", "d"], threshold=0.6)
    for index, name in enumerate("abcd"):
        row = report["per_class"][name]
        assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(truth[:, index], scores[:, index]))
        assert row["average_precision"] == pytest.approx(skm.average_precision_score(truth[:, index], scores[:, index]))
        predicted = scores[:, index] >= 0.6
        assert row["f1"] == pytest.approx(skm.f1_score(truth[:, index], predicted))
        assert row["recall"] == pytest.approx(skm.recall_score(truth[:, index], predicted))


@pytest.mark.parametrize(
    ("y_true", "scores", "threshold", "message"),
    [
        (ML_TRUE[:, :1], ML_SCORES, 0.5, "y_true must have shape (images, 2)"),
        (ML_TRUE[:0], ML_SCORES[:0], 0.5, "got (0, 2)"),
        (ML_TRUE.astype(int) * 2, ML_SCORES, 0.5, "only 0 and 1"),
        (ML_TRUE, ML_SCORES[:3], 0.5, "scores must have shape (4, 2), got (3, 2)"),
        (ML_TRUE, np.full((4, 2), np.inf), 0.5, "scores[0, 0] is inf"),
        (ML_TRUE, ML_SCORES, float("nan"), "threshold must be a finite number"),
    ],
)
def test_bad_multilabel_input(y_true, scores, threshold, message):
    with pytest.raises(MetricsError) as caught:
        multilabel_report(y_true, scores, ["effusion", "mass"], threshold)
    assert message in str(caught.value)


# --- IRMA ------------------------------------------------------------------------------------------------

TRUE_CODES = ["1121-127-700-500"] * 4
PREDICTED_CODES = [
    "1121-127-700-500",  # correct
    "1121-125-700-500",  # directional wrong at position 3: 1/64 (see tests/test_irma.py)
    "11**-125-700-500",  # technical not known from position 3: 21/536, plus the directional 1/64
    "2121-227-800-600",  # every axis wrong from position 1: 1
]


def test_irma_accuracies_without_tables():
    report = irma_report(TRUE_CODES, PREDICTED_CODES, None)
    assert report["accuracy"] == 1 / 4
    # technical: images 0, 1 (11** is not correct); directional: image 0; anatomical and biological: 0, 1, 2
    assert report["axis_accuracy"] == {
        "technical": 2 / 4,
        "directional": 1 / 4,
        "anatomical": 3 / 4,
        "biological": 3 / 4,
    }
    assert "error_score" not in report and report["note"] == IRMA_TABLES_NOTE
    assert "IRMA code tables" in report["note"]


def test_irma_error_score_with_real_tables():
    tables = CodeTables.load(shared_path("irma-code-tables"))
    report = irma_report(TRUE_CODES, PREDICTED_CODES, tables)
    expected = Fraction(1, 64) + Fraction(21, 536) + Fraction(1, 64) + 1
    assert report["error_score"] == pytest.approx(float(expected))
    assert report["mean_error_score"] == pytest.approx(float(expected / 4))
    assert report["accuracy"] == 1 / 4 and "note" not in report


@pytest.mark.parametrize(
    ("true_codes", "predicted_codes", "message"),
    [
        (TRUE_CODES, PREDICTED_CODES[:3], "4 true codes but 3 predicted codes"),
        ([], [], "no IRMA codes given"),
        (["1121-127-700-500"], ["1121-127-70"], "predicted_codes[0]: invalid IRMA code '1121-127-70'"),
        (["11**-127-700-500"], ["1121-127-700-500"], "true_codes[0] is '11**-127-700-500'"),
        ("1121-127-700-500", ["1121-127-700-500"], "got a single text"),
    ],
)
def test_bad_irma_input(true_codes, predicted_codes, message):
    with pytest.raises(MetricsError) as caught:
        irma_report(true_codes, predicted_codes, None)
    assert message in str(caught.value)


# --- report files ----------------------------------------------------------------------------------------


def test_classification_report_files_round_trip(tmp_path, three_class):
    json_path, markdown_path = write_report({"chest": three_class}, tmp_path / "out", name="chest")
    assert (json_path.name, markdown_path.name) == ("chest.json", "chest.md")
    text = json_path.read_text()
    assert json.loads(text) == {"chest": three_class}
    assert text == json.dumps({"chest": three_class}, sort_keys=True, indent=2) + "\n"
    markdown = markdown_path.read_text()
    assert "- Accuracy: 0.6000" in markdown
    assert "| pneumonia | 3 | 0.3333 | 0.8571 | 0.5000 | 0.7500 |" in markdown
    assert "| macro | 10 | 0.5833 |" in markdown and "| weighted | 10 | 0.6000 |" in markdown
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["chest.json", "chest.md"]  # no temp files


def test_undefined_figures_read_n_a(tmp_path):
    report = classification_report(np.array([0, 0]), np.array([0, 0]), ["a", "b|c"])
    markdown = write_report({"classification": report}, tmp_path)[1].read_text()
    assert "| b\\|c | 0 | n/a | 1.0000 | n/a |" in markdown


def test_multilabel_and_irma_report_files(tmp_path):
    multilabel = multilabel_report(ML_TRUE, ML_SCORES, ["effusion", "mass"])
    json_path, markdown_path = write_report({"findings": multilabel}, tmp_path, name="nih")
    assert json.loads(json_path.read_text()) == {"findings": multilabel}
    assert "| effusion | 2 | 0.7500 | 0.8333 |" in markdown_path.read_text()
    irma = irma_report(TRUE_CODES, PREDICTED_CODES, None)
    json_path, markdown_path = write_report({"irma": irma}, tmp_path, name="irma")
    assert json.loads(json_path.read_text()) == {"irma": irma}
    markdown = markdown_path.read_text()
    assert "| technical | 0.5000 |" in markdown and IRMA_TABLES_NOTE in markdown


def test_report_rewrite_replaces_the_old_file(tmp_path, three_class):
    write_report({"irma": irma_report(TRUE_CODES, PREDICTED_CODES, None)}, tmp_path)
    json_path, _ = write_report({"chest": three_class}, tmp_path)
    assert json.loads(json_path.read_text()) == {"chest": three_class}


def test_bad_report_writes_nothing(tmp_path, three_class):
    with pytest.raises(MetricsError, match="section 'x' is not a cbmir report: 'kind' is None"):
        write_report({"x": {"accuracy": 1.0}}, tmp_path)
    with pytest.raises(MetricsError, match="no reports given"):
        write_report({}, tmp_path)
    with pytest.raises(MetricsError, match="cannot be written as JSON"):
        write_report({"chest": {**three_class, "accuracy": float("nan")}}, tmp_path)
    with pytest.raises(MetricsError, match="plain file name"):
        write_report({"chest": three_class}, tmp_path, name="../escape")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_metrics_error(tmp_path, three_class):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MetricsError, match="cannot write"):
        write_report({"chest": three_class}, blocker / "reports")


# --- plots -----------------------------------------------------------------------------------------------


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_plot_confusion_matrix(tmp_path, three_class):
    path = plot_confusion_matrix(three_class["confusion_matrix"], CLASSES, tmp_path / "plots" / "confusion.png")
    assert path == tmp_path / "plots" / "confusion.png"
    assert_png(path)


def test_plot_large_confusion_matrix_without_annotations(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 20, (60, 60))
    matrix[5] = 0  # a class without images: its row stays blank instead of dividing by zero
    assert_png(plot_confusion_matrix(matrix, [f"class {i}" for i in range(60)], tmp_path / "large.png"))


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[1, 2], [3, 4]], "matrix must have shape (3, 3)"),
        ([[1, 0, 0], [0, -1, 0], [0, 0, 1]], "non-negative whole numbers"),
        ([[1, 0, 0], [0, 0.5, 0], [0, 0, 1]], "non-negative whole numbers"),
    ],
)
def test_bad_confusion_matrix(tmp_path, matrix, message):
    with pytest.raises(MetricsError) as caught:
        plot_confusion_matrix(matrix, CLASSES, tmp_path / "bad.png")
    assert message in str(caught.value)
    assert not (tmp_path / "bad.png").exists()


HISTORY = [
    {
        "epoch": epoch,
        "train_loss": 1.2 / epoch,
        "val_loss": 1.3 / epoch + 0.05 * epoch,
        "train_accuracy": 1 - 0.5 / epoch,
        "val_accuracy": 0.95 - 0.5 / epoch,
    }
    for epoch in range(1, 11)
]


def test_plot_history(tmp_path):
    assert_png(plot_history(HISTORY, tmp_path / "history.png"))


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([], "history is empty"),
        ([{"epoch": 1, "train_loss": 1.0}], "history[0] lacks val_loss, train_accuracy, val_accuracy"),
        ([{**HISTORY[0], "val_loss": None}], "history[0]['val_loss'] is None, expected a number"),
        (["epoch 1"], "history[0] is a str, expected a dict"),
    ],
)
def test_bad_history(tmp_path, history, message):
    with pytest.raises(MetricsError) as caught:
        plot_history(history, tmp_path / "history.png")
    assert message in str(caught.value)
