"""Tests of cbmir.irma. Tests using `real_tables` or `shared_path` read the IRMA code tables and codes from the
shared data folder (skipped with a reason when absent); the score arithmetic is also checked on a small
synthetic table written to tmp_path."""

from fractions import Fraction

import pytest

from cbmir.errors import CbmirError
from cbmir.irma import (
    AXES,
    TABLES_ENV,
    CodeTableError,
    CodeTables,
    CodeTablesNotFoundError,
    IrmaCode,
    IrmaCodeError,
    axis_error,
    axis_name,
    error_score,
    matches,
    run_error_score,
)
from cbmir.settings import Settings, load_settings
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def real_tables() -> CodeTables:
    return CodeTables.load(shared_path("irma-code-tables"))


# The same tree on every axis: 1 -> 10, 11, 12, 13; 2; 3; and 0 at the top.
SYNTHETIC = "0;unspecified\n1;alpha\n10;unspecified\n11;alpha one\n12;alpha two\n13;alpha three\n2;beta\n3;gamma\n"


@pytest.fixture
def synthetic_tables(tmp_path) -> CodeTables:
    for name in ("A.csv", "B.csv", "C.csv", "D.csv"):
        (tmp_path / name).write_text(SYNTHETIC)
    return CodeTables.load(tmp_path)


def error_message(text: str) -> str:
    with pytest.raises(IrmaCodeError) as caught:
        IrmaCode.parse(text)
    return str(caught.value)


# --- parsing ---------------------------------------------------------------------------------------------


def test_parse_dashed_form():
    code = IrmaCode.parse("1121-127-700-500")
    assert (code.technical, code.directional, code.anatomical, code.biological) == ("1121", "127", "700", "500")
    assert str(code) == "1121-127-700-500"


def test_parse_without_dashes_and_with_blanks():
    assert IrmaCode.parse(" 1121127700500\n") == IrmaCode.parse("1121-127-700-500")


def test_parse_letters_are_normalised_to_lower_case():
    code = IrmaCode.parse("311A-4A0-91A-4A4")
    assert str(code) == "311a-4a0-91a-4a4"
    assert code == IrmaCode("311a", "4a0", "91a", "4a4")


def test_parse_not_known_positions():
    code = IrmaCode.parse("11**-***-9**-700")
    assert code.technical == "11**" and code.directional == "***"
    assert not code.is_complete
    assert IrmaCode.parse("1121-127-700-500").is_complete


def test_axis_access_by_name_and_alias():
    code = IrmaCode.parse("1121-127-700-500")
    assert [code[axis] for axis in AXES] == ["1121", "127", "700", "500"]
    assert [code[alias] for alias in ("T", "D", "A", "b")] == ["1121", "127", "700", "500"]
    assert axis_name("Anatomical") == "anatomical"
    with pytest.raises(IrmaCodeError, match="unknown IRMA axis 'X'.*T, D, A, B"):
        code["X"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1121-127-700", "invalid IRMA code '1121-127-700': 3 dash-separated groups, expected TTTT-DDD-AAA-BBB"),
        ("1121-127-700-500-1", "5 dash-separated groups"),
        ("112112770050", "invalid IRMA code '112112770050': 12 characters, expected TTTT-DDD-AAA-BBB"),
        ("", "invalid IRMA code '': 0 characters"),
        ("1121-12-700-500", "'1121-12-700-500': the directional axis '12' has 2 characters, expected 3"),
        ("112-1270-700-500", "the technical axis '112' has 3 characters, expected 4"),
        ("1121-1#7-700-500", "invalid IRMA code '1121-1#7-700-500': directional axis position 2 is '#'; allowed are"),
        ("1121127700 00", "biological axis position 1 is ' '"),
        ("1121-127-7ü0-500", "anatomical axis position 2 is 'ü'"),
        ("1*21-127-700-500", "technical axis position 3 is '2' after '*' at position 2; once a position is not known"),
        ("1121-127-700-5*0", "biological axis position 3 is '0' after '*' at position 2"),
    ],
)
def test_parse_errors_name_the_text_and_the_problem(text, expected):
    assert expected in error_message(text)


def test_parse_error_is_a_cbmir_error_and_rejects_non_text():
    with pytest.raises(CbmirError, match="must be text, got int 1121"):
        IrmaCode.parse(1121)  # type: ignore[arg-type]  # the runtime check under test


def test_direct_construction_is_validated():
    with pytest.raises(IrmaCodeError, match="invalid IRMA code '1121-127-700-50': the biological axis '50'"):
        IrmaCode("1121", "127", "700", "50")


# --- prefix matching -------------------------------------------------------------------------------------


def test_matches_axis_prefix():
    leg = "1121-120-913-700"
    assert matches(leg, "anatomical", "9")
    assert matches(leg, "A", "91")
    assert matches(IrmaCode.parse(leg), "a", "913")
    assert not matches(leg, "A", "92")
    assert not matches(leg, "A", "90")  # "leg, unspecified" is a code of its own, not a wildcard
    assert matches(leg, "T", "112")
    assert matches("1121-4A0-914-700", "D", "4A")
    assert not matches("1121-120-9**-700", "A", "91")


@pytest.mark.parametrize(
    ("axis", "prefix", "expected"),
    [
        ("A", "9123", "IRMA anatomical prefix '9123' has 4 characters but the axis has only 3"),
        ("T", "11211", "IRMA technical prefix '11211' has 5 characters but the axis has only 4"),
        ("A", "9-", "IRMA anatomical prefix '9-': position 2 is '-'"),
        ("A", "9*", "IRMA anatomical prefix '9*': position 2 is '*'"),
        ("B", "", "empty IRMA biological prefix"),
        ("Z", "9", "unknown IRMA axis 'Z'"),
    ],
)
def test_matches_rejects_bad_prefixes(axis, prefix, expected):
    with pytest.raises(IrmaCodeError) as caught:
        matches("1121-120-913-700", axis, prefix)
    assert expected in str(caught.value)


# --- tables: missing, loading quirks ---------------------------------------------------------------------


def test_missing_tables_say_where_to_put_them(tmp_path):
    (tmp_path / "A.csv").write_text(SYNTHETIC)
    with pytest.raises(CodeTablesNotFoundError) as caught:
        CodeTables.load(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "missing B.csv, C.csv, D.csv" in message
    assert "A.csv (technical), B.csv (directional), C.csv (anatomical), D.csv (biological)" in message
    assert TABLES_ENV in message


def test_tables_folder_from_the_environment_through_the_settings(monkeypatch):
    monkeypatch.setenv(TABLES_ENV, str(shared_path("irma-code-tables")))
    folder = load_settings(Settings).irma_tables
    assert folder is not None and CodeTables.load(folder).describe("1121-127-700-500").startswith("x-ray")
    monkeypatch.delenv(TABLES_ENV)
    assert load_settings(Settings).irma_tables is None


def test_everything_but_decoding_works_without_tables(tmp_path):
    code = IrmaCode.parse("1121-120-913-700")
    assert matches(code, "A", "9") and str(code) == "1121-120-913-700"
    with pytest.raises(CodeTablesNotFoundError):
        CodeTables.load(tmp_path)


def test_table_encodings_line_ends_and_wrapped_lines(tmp_path):
    utf8 = "1;Röntgen\r\r\n;\r\r\n11;Übersicht (overview\r\r\n;\r\r\nimage);zweiteilig)\r\r\n2;Ultraschall"
    (tmp_path / "A.csv").write_text(utf8, encoding="utf-8", newline="")
    (tmp_path / "B.csv").write_bytes("1;Röntgen\r2;Schädel\r".encode("latin-1"))
    (tmp_path / "C.csv").write_text(SYNTHETIC, encoding="utf-8-sig")
    (tmp_path / "D.csv").write_text(SYNTHETIC)
    tables = CodeTables.load(tmp_path)
    assert tables["T"].entries == {
        "1": "Röntgen",
        "11": "Übersicht (overview image) zweiteilig)",
        "2": "Ultraschall",
    }
    assert tables["T"].issues == ("A.csv line 5: 'image);zweiteilig)' read as the continuation of 11",)
    assert tables["D"].entries == {"1": "Röntgen", "2": "Schädel"}
    assert tables["A"].entries["0"] == "unspecified"


def test_duplicate_code_keeps_the_entry_placed_under_its_parent(tmp_path):
    for name in ("B.csv", "C.csv", "D.csv"):
        (tmp_path / name).write_text(SYNTHETIC)
    (tmp_path / "A.csv").write_text("2;sono\n21;A-mode\n221;3.5 MHz\n22;B-mode\n221;sector scan\n21;again\n")
    table = CodeTables.load(tmp_path)["T"]
    assert table.entries["221"] == "sector scan" and table.entries["21"] == "A-mode"
    assert table.issues == (
        "A.csv line 5: 221 defined twice; kept 'sector scan', ignored '3.5 MHz'",
        "A.csv line 6: 21 defined twice; kept 'A-mode', ignored 'again'",
    )


def test_malformed_table_names_file_and_line(tmp_path):
    for name in ("A.csv", "B.csv", "C.csv"):
        (tmp_path / name).write_text(SYNTHETIC)
    (tmp_path / "D.csv").write_text(";\nbiological;system\n1;x\n")
    with pytest.raises(CodeTableError) as caught:
        CodeTables.load(tmp_path)
    assert f"{tmp_path / 'D.csv'} line 2: 'biological;system' is not 'code;text'" in str(caught.value)


def test_real_table_quirks_are_repaired_and_reported(real_tables):
    technical = real_tables["T"]
    # A.csv lists "221;3.5 MHz" among the A-mode codes 21x (a typo for 211) and again as B-mode "sector scan".
    assert technical.entries["221"] == "sector scan"
    # A.csv wraps "43;single photon emission" / "computed;tomography (SPECT)" over two lines.
    assert technical.entries["43"] == "single photon emission computed tomography (SPECT)"
    assert len(technical.issues) == 2
    assert all(not real_tables[axis].issues for axis in ("D", "A", "B"))


# --- decoding --------------------------------------------------------------------------------------------


def test_decode_example(real_tables):
    assert real_tables.decode("1121-127-700-500") == {
        "technical": ["x-ray", "plain radiography", "analog", "overview image"],
        "directional": ["coronal", "anteroposterior", "supine"],
        "anatomical": ["abdomen"],
        "biological": ["uropoietic system"],
    }
    assert real_tables.describe(IrmaCode.parse("1121-127-700-500")) == (
        "x-ray, plain radiography, analog, overview image / coronal, anteroposterior, supine / abdomen / "
        "uropoietic system"
    )


def test_decode_full_texts_keep_remarks(real_tables):
    assert real_tables.decode("1121-127-700-500", full=True)["directional"] == [
        "coronal",
        "anteroposterior (AP, coronal)",
        "supine",
    ]


def test_decode_zeros_stars_and_letters(real_tables):
    decoded = real_tables.decode("1***-4a0-***-000")
    assert decoded["technical"] == ["x-ray"]
    assert decoded["directional"] == ["other orientation", "left anterior oblique"]
    assert decoded["anatomical"] == ["not known"]
    assert decoded["biological"] == ["unspecified"]
    # an inner 0 is a level of its own ("unspecified"), only trailing zeros are dropped
    assert real_tables.decode("1011-100-100-100")["technical"][:2] == ["x-ray", "unspecified"]


def test_unknown_codes_are_marked_not_fatal(real_tables):
    # 12f and 961 occur in the ImageCLEF 2007 data but not in B.csv / the truncated C.csv
    decoded = real_tables.decode("1121-12f-961-700")
    assert decoded["directional"] == ["coronal", "anteroposterior", "[not in B.csv: 12f]"]
    assert decoded["anatomical"] == ["lower extremity / leg", "hi", "[not in C.csv: 961]"]
    assert real_tables.validate("1121-12f-961-700") == [
        "1121-12f-961-700: directional code '12f' is not in B.csv (known there: 120, 121, 122, 123, 124, "
        "125, 126, 127, 128, 129, 12a, 12b, 12c, 12d, 12e)",
        "1121-12f-961-700: anatomical code '961' is not in C.csv",
    ]
    assert real_tables.validate("1121-127-700-500") == []


def test_all_dev_codes_parse_and_decode():
    lines = shared_path("irma2007-dev/codes.csv").read_text().splitlines()
    assert lines[0] == "image_id;irma_code"
    texts = [line.split(";")[1] for line in lines[1:] if line.strip()]
    assert len(texts) == 650
    tables = CodeTables.load(shared_path("irma-code-tables"))
    for text in texts:
        code = IrmaCode.parse(text)
        assert str(code) == text.strip()
        for axis, levels in tables.decode(code).items():
            assert levels and levels[0] and not levels[0].startswith("[not in"), (text, axis, levels)


# --- error score -----------------------------------------------------------------------------------------


def test_branch_counts_real_tables(real_tables):
    true = "1121-127-700-500"
    # technical 1121: A.csv has 0-8 at the top; 10-16 below 1; 110-116 below 11; 1120-1126 below 112
    assert real_tables.branch_counts(true, "T") == [9, 7, 7, 7]
    # directional 127: B.csv has 0-5; 10-12 below 1; 120-129 and 12a-12e below 12
    assert real_tables.branch_counts(true, "D") == [6, 3, 15]
    # anatomical 700: C.csv has 0-9; 70-73 below 7; nothing below 70, so only the implicit 0
    assert real_tables.branch_counts(true, "A") == [10, 4, 1]
    # a code the table lacks counts itself: below 12 there are 15 codes plus 12f
    assert real_tables.branch_counts("1121-12f-961-700", "D") == [6, 3, 16]


def test_perfect_prediction_scores_zero(real_tables):
    assert error_score("1121-127-700-500", "1121-127-700-500", real_tables) == 0.0


def test_wrong_from_the_first_position_on_every_axis_scores_one(real_tables):
    assert error_score("1121-127-700-500", "2121-227-800-600", real_tables) == pytest.approx(1.0)
    # after a wrong position, later '*' still count as wrong
    assert axis_error("1121-127-700-500", "2***-227-800-600", "T", real_tables) == pytest.approx(0.25)


def test_wrong_at_position_three_real_tables(real_tables):
    # directional true 127 (supine), predicted 125 (upright); b = [6, 3, 15]
    #   worst = 1/(6*1) + 1/(3*2) + 1/(15*3) = 1/6 + 1/6 + 1/45 = 16/45
    #   error = 1/(15*3) = 1/45;  0.25 * (1/45) / (16/45) = 1/64
    assert axis_error("1121-127-700-500", "1121-125-700-500", "D", real_tables) == pytest.approx(1 / 64)


def test_not_known_prediction_real_tables(real_tables):
    # technical true 1121, predicted 11**; b = [9, 7, 7, 7]
    #   worst = 1/9 + 1/(7*2) + 1/(7*3) + 1/(7*4) = (28 + 18 + 12 + 9)/252 = 67/252
    #   error = 0.5 * (1/21 + 1/28) = 0.5 * 21/252;  0.25 * 10.5/67 = 21/536
    assert axis_error("1121-127-700-500", "11**-127-700-500", "T", real_tables) == pytest.approx(21 / 536)
    assert error_score("1121-127-700-500", "11**-125-700-500", real_tables) == pytest.approx(21 / 536 + 1 / 64)


def test_score_on_synthetic_table(synthetic_tables):
    true = "1100-110-110-110"
    # every axis: b = [4 (0-3), 4 (10-13), 1 (only the implicit 0 below 11)], technical one more 1 (below 110)
    assert synthetic_tables.branch_counts(true, "D") == [4, 4, 1]
    assert synthetic_tables.branch_counts(true, "T") == [4, 4, 1, 1]
    # axis worst = 1/4 + 1/8 + 1/3 = 17/24
    # directional 120: wrong from position 2 -> (1/8 + 1/3) / (17/24) = 11/17 -> * 0.25 = 11/68
    # anatomical 1**: not known from position 2 -> 0.5 * 11/17 -> * 0.25 = 11/136
    # biological 2**: wrong at position 1 -> 0.25
    # technical 1100: correct -> 0
    predicted = "1100-120-1**-2**"
    expected = Fraction(11, 68) + Fraction(11, 136) + Fraction(1, 4)
    assert axis_error(true, predicted, "directional", synthetic_tables) == pytest.approx(11 / 68)
    assert axis_error(true, predicted, "A", synthetic_tables) == pytest.approx(11 / 136)
    assert error_score(true, predicted, synthetic_tables) == pytest.approx(float(expected))
    # technical 1110 vs true 1100: wrong at position 3 of 4; worst = 17/24 + 1/(1*4) = 23/24
    #   error = 1/3 + 1/4 = 14/24 -> 0.25 * 14/23 = 7/46
    assert axis_error(true, "1110-110-110-110", "T", synthetic_tables) == pytest.approx(7 / 46)
    pairs: list[tuple[IrmaCode | str, str]] = [
        (true, true),
        (true, predicted),
        (IrmaCode.parse(true), "3000-300-300-300"),
    ]
    assert run_error_score(pairs, synthetic_tables) == pytest.approx(float(expected) + 1.0)


def test_true_code_must_be_complete(synthetic_tables):
    with pytest.raises(IrmaCodeError, match="the true code '11\\*\\*-110-110-110' contains '\\*'"):
        error_score("11**-110-110-110", "1100-110-110-110", synthetic_tables)
