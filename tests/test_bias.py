"""Identity groups from the gender lexicon and hand-computed per-group figures and flags."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.bias import Lexicon, assign_groups, check_data_bias, load_gender_lexicon
from pipeline.identity import groups_from_column

LABELS = ["fresh", "rotten"]


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return load_gender_lexicon()


def groups_of(text: str, lexicon: Lexicon) -> set[str]:
    row = assign_groups([text], lexicon).iloc[0]
    return {name for name, hit in row.items() if hit}


# --- matching -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The theme is tired", set()),  # "he" inside "the"/"theme"
        ("Another shepherd in the wild", set()),  # "her", "she", "he" inside words
        ("A study of humankind in Manhattan", set()),  # "man" inside words
        ("Black Friday shoppers will shrug", set()),
        ("She steals every scene", {"female"}),
        ("SHE STEALS EVERY SCENE", {"female"}),
        ("he's miscast", {"male"}),
        ("The spokeswoman spoke", {"female"}),  # "man" inside "spokeswoman" does not count
        ("A mother and her son", {"female", "male"}),
        ("His ex girlfriend returns", {"female", "male"}),  # multi-word term, spaced
        ("A Catholic priest and a nun", {"female", "male"}),
        ("A priest walks in", set()),  # only the two-word term is listed
    ],
)
def test_whole_word_case_insensitive_matching(text: str, expected: set[str], lexicon: Lexicon):
    assert groups_of(text, lexicon) == expected


def test_assign_groups_shape_and_order():
    lexicon = Lexicon({"a": frozenset({"cat"}), "b": frozenset({"dog", "big dog"})})
    membership = assign_groups(["cat", "Big Dog", "catalog", "a dog and a cat"], lexicon)
    assert membership.shape == (4, 2)
    assert list(membership.columns) == ["a", "b"]
    assert membership["a"].tolist() == [True, False, False, True]
    assert membership["b"].tolist() == [False, True, False, True]


def test_terms_with_regex_characters_are_escaped():
    lexicon = Lexicon({"g": frozenset({"c.t"})})
    assert assign_groups(["c.t here", "cat here"], lexicon)["g"].tolist() == [True, False]


# --- the lexicon file ---------------------------------------------------------------------------


def test_gender_lexicon_sides(lexicon: Lexicon):
    female, male = lexicon.groups["female"], lexicon.groups["male"]
    assert set(lexicon.groups) == {"female", "male"}
    assert {"she", "woman", "spokeswoman", "wives", "her", "mary", "ex girlfriend"} <= female
    assert {"he", "man", "husbands", "spokesman", "his", "john", "catholic priest"} <= male
    assert not female & male
    assert len(female) == 49 and len(male) == 49
    assert all(t == t.lower() and "_" not in t for t in female | male)


def test_load_gender_lexicon_from_an_explicit_file(tmp_path: Path):
    path = tmp_path / "b.json"
    path.write_text(
        json.dumps(
            {
                "gender": {
                    "definitional_pairs": [["Queen", "King"]],
                    # Male first, except the two pairs the file lists female first.
                    "equalize_pairs": [
                        ["Twin_brother", "twin_sister"],
                        ["wives", "husbands"],
                        ["ex_girlfriend", "ex_boyfriend"],
                    ],
                }
            }
        ),
        encoding="utf-8",
    )
    lexicon = load_gender_lexicon(path)
    assert lexicon.groups["female"] == {"queen", "twin sister", "wives", "ex girlfriend"}
    assert lexicon.groups["male"] == {"king", "twin brother", "husbands", "ex boyfriend"}
    assert lexicon.swaps == (
        ("queen", "king"),
        ("twin sister", "twin brother"),
        ("wives", "husbands"),
        ("ex girlfriend", "ex boyfriend"),
    )


# --- check_data_bias ----------------------------------------------------------------------------

TEXTS = [
    "She steals every scene",  # 0 female, fresh
    "The woman at its heart is wonderful",  # 1 female, fresh
    "Her performance is flat",  # 2 female, rotten
    "He is miscast",  # 3 male, rotten
    "The men are boring",  # 4 male, rotten
    "His best film in years",  # 5 male, fresh
    "A mother and daughter reunite",  # 6 female, fresh
    "The theme is tired",  # 7 none, rotten
    "Black Friday shoppers will shrug",  # 8 none, rotten
    "Gorgeous and wise",  # 9 none, fresh
]
TEXT_LABELS = [
    "fresh",
    "fresh",
    "rotten",
    "rotten",
    "rotten",
    "fresh",
    "fresh",
    "rotten",
    "rotten",
    "fresh",
]


def test_check_data_bias_hand_computed(lexicon: Lexicon):
    report = check_data_bias(TEXTS, TEXT_LABELS, lexicon, LABELS, min_group_rows=4)
    assert report.positive_label == "fresh"
    assert report.total_rows == 10
    assert report.min_group_rows == 4
    female, male = report.groups
    assert female.group == "female" and male.group == "male"

    # female: rows 0, 1, 2, 6 -> 3 fresh of 4; the rest (3, 4, 5, 7, 8, 9) -> 2 fresh of 6.
    assert female.rows == 4
    assert female.share == pytest.approx(0.4)
    assert female.label_counts == {"fresh": 3, "rotten": 1}
    assert female.positive_rate == pytest.approx(3 / 4)
    assert female.rest_positive_rate == pytest.approx(2 / 6)
    assert female.rate_difference == pytest.approx(3 / 4 - 1 / 3)  # 5/12
    assert female.rate_ratio == pytest.approx(9 / 4)
    assert female.too_small is False

    # male: rows 3, 4, 5 -> 1 fresh of 3; the rest (0, 1, 2, 6, 7, 8, 9) -> 4 fresh of 7.
    assert male.rows == 3
    assert male.share == pytest.approx(0.3)
    assert male.label_counts == {"fresh": 1, "rotten": 2}
    assert male.positive_rate == pytest.approx(1 / 3)
    assert male.rest_positive_rate == pytest.approx(4 / 7)
    assert male.rate_difference == pytest.approx(-5 / 21)
    assert male.rate_ratio == pytest.approx(7 / 12)
    assert male.too_small is True  # 3 < 4
    # Default limits: no share minimum, any gap allowed; only the small group is listed.
    assert not any(g.under_represented or g.label_gap_flagged for g in report.groups)
    assert report.flags() == ["male: 3 rows, fewer than 4; too small to judge"]


def test_positive_label_is_the_first_of_the_label_set(lexicon: Lexicon):
    report = check_data_bias(TEXTS, TEXT_LABELS, lexicon, ["rotten", "fresh"], min_group_rows=1)
    female = report.groups[0]
    assert report.positive_label == "rotten"
    assert female.label_counts == {"rotten": 1, "fresh": 3}
    assert female.positive_rate == pytest.approx(1 / 4)
    assert female.rest_positive_rate == pytest.approx(4 / 6)


def test_group_with_zero_rows(lexicon: Lexicon):
    texts = ["She shines", "A dull plot", "Nothing works"]
    report = check_data_bias(texts, ["fresh", "rotten", "fresh"], lexicon, LABELS, 1)
    male = report.groups[1]
    assert male.rows == 0
    assert male.share == 0.0
    assert male.label_counts == {"fresh": 0, "rotten": 0}
    assert male.positive_rate is None
    assert male.rest_positive_rate == pytest.approx(2 / 3)
    assert male.rate_difference is None
    assert male.rate_ratio is None
    assert male.too_small is True


def test_everyone_in_the_group_and_a_zero_rest_rate():
    lexicon = Lexicon({"all": frozenset({"film"}), "some": frozenset({"great"})})
    texts = ["great film", "great film again", "bad film"]
    report = check_data_bias(texts, ["fresh", "fresh", "rotten"], lexicon, LABELS, 1)
    everyone, some = report.groups
    assert everyone.rows == 3 and everyone.share == 1.0
    assert everyone.positive_rate == pytest.approx(2 / 3)
    assert everyone.rest_positive_rate is None
    assert everyone.rate_difference is None and everyone.rate_ratio is None
    # Outside "some" only a rotten row: rest rate 0, difference 1, ratio undefined.
    assert some.positive_rate == 1.0
    assert some.rest_positive_rate == 0.0
    assert some.rate_difference == 1.0
    assert some.rate_ratio is None


def test_labels_outside_the_set_are_not_counted_but_are_not_positive():
    lexicon = Lexicon({"g": frozenset({"she"})})
    report = check_data_bias(["she", "she", "x"], ["fresh", "meh", "fresh"], lexicon, LABELS, 1)
    group = report.groups[0]
    assert group.label_counts == {"fresh": 1, "rotten": 0}
    assert group.positive_rate == 0.5


def test_empty_input_gives_empty_groups(lexicon: Lexicon):
    report = check_data_bias([], [], lexicon, LABELS, 1)
    assert report.total_rows == 0
    assert [g.rows for g in report.groups] == [0, 0]
    assert all(g.share == 0.0 and g.positive_rate is None for g in report.groups)


def test_length_mismatch_raises(lexicon: Lexicon):
    with pytest.raises(ValueError, match="^3 texts but 2 labels$"):
        check_data_bias(["a", "b", "c"], ["fresh", "rotten"], lexicon, LABELS, 1)


def test_report_to_dict(lexicon: Lexicon):
    data = check_data_bias(
        TEXTS, TEXT_LABELS, lexicon, LABELS, 4, min_group_share=0.35, max_label_rate_gap=0.2
    ).to_dict()
    assert data["total_rows"] == 10
    assert data["min_group_share"] == 0.35 and data["max_label_rate_gap"] == 0.2
    assert data["groups"][0]["label_gap_flagged"] is True
    assert data["groups"][1]["under_represented"] is True
    assert data["groups"][0]["group"] == "female"
    assert data["groups"][0]["label_counts"] == {"fresh": 3, "rotten": 1}
    assert json.loads(json.dumps(data)) == data


# --- flags --------------------------------------------------------------------------------------


def test_flags_hand_computed(lexicon: Lexicon):
    report = check_data_bias(
        TEXTS, TEXT_LABELS, lexicon, LABELS, 4, min_group_share=0.35, max_label_rate_gap=0.2
    )
    female, male = report.groups
    # female: 4 rows (share 0.4), rate 3/4 vs 2/6: difference 5/12 > 0.2.
    assert (female.too_small, female.under_represented, female.label_gap_flagged) == (
        False,
        False,
        True,
    )
    # male: 3 rows < 4, share 0.3 < 0.35; its gap -5/21 is beyond 0.2 but too small to judge.
    assert (male.too_small, male.under_represented, male.label_gap_flagged) == (True, True, False)
    assert report.flags() == [
        "female: 'fresh' rate 0.750 vs 0.333 for the rest (difference +0.417, ratio 2.25), "
        "beyond the limit 0.200",
        "male: 3 rows, fewer than 4; too small to judge",
        "male: under-represented, 3 rows of 10 (30.0%), below 35.0%",
    ]


def test_membership_with_an_empty_group_and_a_group_of_one():
    membership = pd.DataFrame(
        {
            "one": [i == 0 for i in range(10)],
            "empty": [False] * 10,
            "big": [i in (0, 1, 5, 6, 9) for i in range(10)],  # the five fresh rows
        }
    )
    report = check_data_bias(
        TEXTS,
        TEXT_LABELS,
        None,
        LABELS,
        2,
        min_group_share=0.2,
        max_label_rate_gap=0.5,
        membership=membership,
    )
    one, empty, big = report.groups
    assert [g.group for g in report.groups] == ["one", "empty", "big"]

    # one: row 0 (fresh); the rest 4 fresh of 9.
    assert one.rows == 1 and one.share == pytest.approx(0.1)
    assert one.label_counts == {"fresh": 1, "rotten": 0}
    assert one.positive_rate == 1.0
    assert one.rest_positive_rate == pytest.approx(4 / 9)
    assert one.rate_difference == pytest.approx(5 / 9)
    assert one.rate_ratio == pytest.approx(9 / 4)
    assert (one.too_small, one.under_represented, one.label_gap_flagged) == (True, True, False)

    assert empty.rows == 0 and empty.share == 0.0
    assert empty.positive_rate is None and empty.rest_positive_rate == pytest.approx(0.5)
    assert empty.rate_difference is None and empty.rate_ratio is None
    assert (empty.too_small, empty.under_represented, empty.label_gap_flagged) == (
        True,
        True,
        False,
    )

    # big: all five fresh rows; the rest are all rotten: difference 1, ratio undefined.
    assert big.rows == 5 and big.share == 0.5
    assert big.label_counts == {"fresh": 5, "rotten": 0}
    assert (big.positive_rate, big.rest_positive_rate, big.rate_difference) == (1.0, 0.0, 1.0)
    assert big.rate_ratio is None
    assert (big.too_small, big.under_represented, big.label_gap_flagged) == (False, False, True)

    assert report.flags() == [
        "one: 1 row, fewer than 2; too small to judge",
        "one: under-represented, 1 row of 10 (10.0%), below 20.0%",
        "empty: 0 rows, fewer than 2; too small to judge",
        "empty: under-represented, 0 rows of 10 (0.0%), below 20.0%",
        "big: 'fresh' rate 1.000 vs 0.000 for the rest (difference +1.000, ratio undefined), "
        "beyond the limit 0.500",
    ]


def test_a_user_group_column_replaces_the_lexicon(lexicon: Lexicon):
    column = ["x", "x", None, "y", "", "x", float("nan"), "y", "y", "x"]
    report = check_data_bias(
        TEXTS, TEXT_LABELS, lexicon, LABELS, 1, membership=groups_from_column(column)
    )
    x, y = report.groups
    # x: rows 0, 1, 5, 9 -> all fresh; y: rows 3, 7, 8 -> all rotten; rows 2, 4, 6 in none.
    assert (x.group, x.rows, x.positive_rate, x.rest_positive_rate) == ("x", 4, 1.0, 1 / 6)
    assert (y.group, y.rows, y.positive_rate, y.rest_positive_rate) == ("y", 3, 0.0, 5 / 7)


def test_a_gap_equal_to_the_limit_is_not_beyond_it():
    # group: 8 fresh of 10; rest: 7 fresh of 10; 0.8 - 0.7 is 0.10000000000000009 in floats.
    membership = pd.DataFrame({"g": [True] * 10 + [False] * 10})
    labels = ["fresh"] * 8 + ["rotten"] * 2 + ["fresh"] * 7 + ["rotten"] * 3
    texts = [""] * 20
    at = check_data_bias(
        texts, labels, None, LABELS, 1, max_label_rate_gap=0.1, membership=membership
    )
    assert at.groups[0].label_gap_flagged is False
    below = check_data_bias(
        texts, labels, None, LABELS, 1, max_label_rate_gap=0.099, membership=membership
    )
    assert below.groups[0].label_gap_flagged is True
    share = check_data_bias(
        texts, labels, None, LABELS, 1, min_group_share=0.5, membership=membership
    )
    assert share.groups[0].under_represented is False  # 0.5 is not below 0.5


def test_membership_and_lexicon_errors(lexicon: Lexicon):
    with pytest.raises(ValueError, match="^membership has 2 rows but there are 3 texts$"):
        check_data_bias(
            ["a", "b", "c"],
            ["fresh"] * 3,
            lexicon,
            LABELS,
            1,
            membership=pd.DataFrame({"g": [1, 0]}),
        )
    with pytest.raises(ValueError, match="pass a lexicon or a membership frame"):
        check_data_bias(["a"], ["fresh"], None, LABELS, 1)


# --- more than two labels: each label one-vs-rest ---------------------------------------------


def test_three_labels_each_label_against_the_rest_by_hand():
    # Rows 0-2 in G1 (a, b, a), row 3 in G2 (c), rows 4-5 in neither (c, c); E is empty.
    labels = ["a", "b", "a", "c", "c", "c"]
    membership = pd.DataFrame(
        {
            "G1": [True, True, True, False, False, False],
            "G2": [False, False, False, True, False, False],
            "E": [False] * 6,
        }
    )
    report = check_data_bias(
        ["t"] * 6, labels, None, ["a", "b", "c"], 1, max_label_rate_gap=0.5, membership=membership
    )
    assert report.one_vs_rest and report.positive_label == ""
    g1, g2, empty = report.groups
    # G1: a 2/3 vs 0/3, b 1/3 vs 0/3, c 0/3 vs 3/3 -> c differs most (-1.0).
    rates = {r.label: (r.rate, r.rest_rate, r.difference) for r in g1.per_label}
    assert rates["a"] == pytest.approx((2 / 3, 0.0, 2 / 3))
    assert rates["b"] == pytest.approx((1 / 3, 0.0, 1 / 3))
    assert rates["c"] == (0.0, 1.0, -1.0)
    assert [r.ratio for r in g1.per_label] == [None, None, 0.0]  # rest rate 0: no ratio
    assert (g1.label, g1.positive_rate, g1.rest_positive_rate, g1.rate_difference) == (
        "c",
        0.0,
        1.0,
        -1.0,
    )
    assert g1.label_gap_flagged
    # G2 (one row, c): a 0 vs 2/5, b 0 vs 1/5, c 1 vs 2/5 -> c, +0.6, ratio 2.5.
    assert g2.label == "c" and g2.rate_difference == pytest.approx(0.6)
    assert g2.rate_ratio == pytest.approx(2.5) and g2.label_gap_flagged
    assert {r.label: r.difference for r in g2.per_label} == pytest.approx(
        {"a": -0.4, "b": -0.2, "c": 0.6}
    )
    # E: no rows, nothing defined; the rest's rates are still reported; never flagged.
    assert empty.rows == 0 and empty.too_small and not empty.label_gap_flagged
    assert [r.rate for r in empty.per_label] == [None, None, None]
    assert [r.rest_rate for r in empty.per_label] == pytest.approx([1 / 3, 1 / 6, 1 / 2])
    assert empty.label == "a" and empty.positive_rate is None
    flags = report.flags()
    assert flags[0] == (
        "G1: 'c' (the label furthest from the rest's) rate 0.000 vs 1.000 for the rest "
        "(difference -1.000, ratio 0.00), beyond the limit 0.500"
    )
    json.dumps(report.to_dict())


def test_two_labels_describe_the_first_label_only():
    report = check_data_bias(
        ["she", "he", "she"],
        ["fresh", "rotten", "rotten"],
        Lexicon({"female": frozenset({"she"})}),
        LABELS,
        1,
    )
    g = report.groups[0]
    assert not report.one_vs_rest and report.positive_label == "fresh"
    assert g.label == "fresh" and g.per_label == []
    assert (g.positive_rate, g.rest_positive_rate) == (0.5, 0.0)
