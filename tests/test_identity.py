"""Identity lexicons: whole-word matching, group columns, counterfactual swaps, CrowS-Pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline import bias, identity
from pipeline.identity import (
    BUILTIN_LEXICON_DIR,
    LEXICON_NAMES,
    Lexicon,
    assign_groups,
    build_lexicons,
    counterfactual_pairs,
    groups_from_column,
    load_crows_pairs,
    load_lexicons,
    render_lexicon,
    swap_terms,
)


@pytest.fixture(scope="module")
def every() -> Lexicon:
    return load_lexicons(list(LEXICON_NAMES))


@pytest.fixture(scope="module")
def built() -> dict[str, dict]:
    return build_lexicons()


def groups_of(text: str, lexicon: Lexicon) -> set[str]:
    row = assign_groups([text], lexicon).iloc[0]
    return {name for name, hit in row.items() if hit}


# --- the lexicon files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", LEXICON_NAMES)
def test_committed_lexicon_files_equal_a_fresh_build(name: str, built: dict[str, dict]):
    committed = (BUILTIN_LEXICON_DIR / f"{name}.json").read_text(encoding="utf-8")
    assert committed == render_lexicon(built[name]), (
        f"pipeline/lexicons/{name}.json is stale; run: {identity.BUILD_COMMAND}"
    )


def test_build_lexicons_command_writes_the_same_files(tmp_path: Path, capsys):
    identity.main(["build-lexicons", "--out", str(tmp_path / "lex")])
    written = sorted(p.name for p in (tmp_path / "lex").iterdir())
    assert written == ["age.json", "gender.json", "race.json", "religion.json"]
    for name in written:
        assert (tmp_path / "lex" / name).read_bytes() == (BUILTIN_LEXICON_DIR / name).read_bytes()
    assert capsys.readouterr().out.count(".json") == 4


def test_lexicon_file_shape(built: dict[str, dict]):
    for data in built.values():
        assert set(data) == {"source", "groups", "exclude", "swaps"}
        assert "build-lexicons" in data["source"]
        for terms in [*data["groups"].values(), data["exclude"]]:
            assert terms == sorted(set(terms))
            assert all(t == t.lower() and "_" not in t for t in terms)
        assert all(len(pair) == 2 for pair in data["swaps"])
    sizes = {
        name: {group: len(terms) for group, terms in data["groups"].items()}
        for name, data in built.items()
    }
    assert sizes == {
        "gender": {"female": 65, "male": 70},
        "race": {"european_american": 42, "african_american": 40},
        "age": {"young": 7, "old": 8},
        "religion": {
            "atheist": 2,
            "buddhist": 2,
            "christian": 17,
            "hindu": 2,
            "jewish": 3,
            "muslim": 2,
            "satanist": 2,
            "wiccan": 2,
        },
    }
    assert {name: len(data["swaps"]) for name, data in built.items()} == {
        "gender": 56,
        "race": 40,
        "age": 7,
        "religion": 17,
    }


def test_gender_lexicon_adds_sided_seed_words_only(built: dict[str, dict]):
    female, male = (set(built["gender"]["groups"][g]) for g in ("female", "male"))
    assert not female & male
    # Today's 49 + 49 definitional and equalize terms are all kept.
    base = bias.load_gender_lexicon()
    assert base.groups["female"] <= female and base.groups["male"] <= male
    # WEAT terms, professions scored by gender, other numbers, multi-word terms.
    assert {"hers", "actress", "waitress", "wife", "aunts", "estranged wife"} <= female
    assert {"him", "monk", "salesman", "husband", "uncles", "eldest son"} <= male
    # Seed words whose side the files do not give stay out.
    assert not {"girlfriend", "bride", "beard", "bull", "lesbian"} & (female | male)
    swaps = [tuple(p) for p in built["gender"]["swaps"]]
    assert swaps[:3] == [("woman", "man"), ("girl", "boy"), ("she", "he")]
    assert {("her", "his"), ("her", "him"), ("hers", "his"), ("wife", "husband")} <= set(swaps)


def test_race_and_age_names(built: dict[str, dict]):
    race, age = built["race"], built["age"]
    names = set(race["groups"]["european_american"]) | set(race["groups"]["african_american"])
    # Common words and a country are dropped, with their pairs.
    assert not {"frank", "jack", "heather", "ebony", "jasmine", "jay", "kenya"} & names
    assert "bill" not in age["groups"]["young"] and "edgar" in age["groups"]["old"]
    for data, (a, b) in (
        (race, ("european_american", "african_american")),
        (age, ("young", "old")),
    ):
        for x, y in data["swaps"]:
            assert x in data["groups"][a] and y in data["groups"][b]
    # Pairs stay within a gender: set 5 has 17 and 19 men's names, so the women pair up.
    assert ["amanda", "nichelle"] in race["swaps"] and ["peter", "lavon"] in race["swaps"]
    assert not any("marcellus" in pair for pair in race["swaps"])  # the 18th man: no partner


def test_religion_groups_come_from_crows_pairs(built: dict[str, dict]):
    groups = built["religion"]["groups"]
    assert groups["jewish"] == ["jew", "jewish", "jews"]
    assert {"catholic", "catholics", "baptist", "mormon", "amish"} <= set(groups["christian"])
    every_term = {t for terms in groups.values() for t in terms}
    assert not {"white", "church", "mosque", "bible", "unitarian", "cathloic"} & every_term
    assert built["religion"]["swaps"][:2] == [["christian", "muslim"], ["christians", "muslims"]]


# --- loading ------------------------------------------------------------------------------------


def test_load_lexicons_merges_with_plain_group_names(every: Lexicon):
    assert list(every.groups)[:6] == [
        "female",
        "male",
        "european_american",
        "african_american",
        "young",
        "old",
    ]
    assert every.lexicon_of["female"] == "gender" and every.lexicon_of["muslim"] == "religion"
    assert {"men in black", "christian bale", "breakfast at tiffany"} <= every.exclude
    assert load_lexicons([]).groups == {}
    assert load_lexicons(["age", "age"]).groups.keys() == {"young", "old"}


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_a_user_file_overrides_the_built_in_one(tmp_path: Path):
    write(
        tmp_path / "gender.json",
        {"groups": {"f": ["Doe"], "m": ["buck"]}, "swaps": [["doe", "buck"]]},
    )
    lexicon = load_lexicons(["gender", "age"], tmp_path)
    assert lexicon.groups == {
        "f": {"doe"},
        "m": {"buck"},
        **load_lexicons(["age"]).groups,
    }
    assert swap_terms("A Doe and a buck", lexicon) == "A Buck and a doe"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"groups": {"female": ["x"]}}, "group 'female' is defined in both .*gender.json and"),
        ({"groups": {"g": ["x"]}, "exclusions": []}, r"unknown keys \['exclusions'\]"),
        ({"groups": ["x"]}, "'groups' must map each group name to a list of terms"),
        ({"groups": {"g": ["x"]}, "swaps": [["a", "b", "c"]]}, "must be a list of .* pairs"),
        ({"groups": {"g": ["x"]}, "exclude": "x"}, "'exclude' must be a list of phrases"),
    ],
)
def test_bad_user_files_are_refused(tmp_path: Path, data: dict, message: str):
    write(tmp_path / "mine.json", data)
    with pytest.raises(ValueError, match=message):
        load_lexicons(["gender", "mine"], tmp_path)


def test_unknown_lexicon_and_missing_folder(tmp_path: Path):
    with pytest.raises(ValueError, match=r"no lexicon named 'caste'; available: \['age', "):
        load_lexicons(["caste"])
    with pytest.raises(ValueError, match="lexicon folder .*nope does not exist; copy"):
        load_lexicons(["gender"], tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_lexicons(["bad"], tmp_path)


# --- matching -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The theme is tired", set()),  # "he" inside "the"/"theme"
        ("Black Friday shoppers will shrug", set()),
        ("She's great", {"female"}),  # a contraction
        ("at his mother's house", {"female", "male"}),  # a possessive
        ("SHE AND HIM", {"female", "male"}),
        ("A frank film, a jack of all trades, heather on the hills", set()),  # dropped names
        ("Emily, Jamal and Cecilia", {"european_american", "african_american"}),  # not "cecil"
        ("Men in Black II and the X-Men", set()),  # excluded titles, with a hyphen
        ("The men in the black car", {"male"}),  # not the excluded phrase
        ("Her ex-girlfriend", {"female"}),  # multi-word term across a hyphen
        ("His ex  girlfriend", {"female", "male"}),  # ... and across spaces
        ("Christian Bale plays a Buddhist", {"buddhist"}),  # a name, not a religion
        ("Christian Bale plays a Christian", {"christian"}),
        ("Breakfast at Tiffany's", set()),
        ("Tiffany's grandpa", {"young", "male"}),
        ("Grandpa Brad", {"male", "european_american", "young"}),  # several groups
        ("Hindus, Jews and Muslims", {"hindu", "jewish", "muslim"}),
        ("the himalayas herald hers", {"female"}),
    ],
)
def test_whole_word_case_insensitive_matching(text: str, expected: set[str], every: Lexicon):
    assert groups_of(text, every) == expected


def test_excluded_phrases_hide_only_their_own_occurrence():
    lexicon = Lexicon({"black": frozenset({"black"})}, exclude=frozenset({"black friday"}))
    hits = assign_groups(
        ["Black Friday deals", "a Black director on Black Friday", "black-friday"], lexicon
    )
    assert hits["black"].tolist() == [False, True, False]


def test_empty_group_and_punctuated_terms():
    lexicon = Lexicon({"none": frozenset(), "jr": frozenset({"jr.", "c.t"})})
    hits = assign_groups(["anything at all", "Sammy Jr. sings", "c.t", "cat", "jr"], lexicon)
    assert hits["none"].tolist() == [False] * 5
    assert hits["jr"].tolist() == [False, True, True, False, False]
    assert assign_groups([], lexicon).shape == (0, 2)


def test_groups_from_column():
    membership = groups_from_column(["b", "a", None, math.nan, "", "  ", " a ", 3])
    assert list(membership.columns) == ["3", "a", "b"]
    assert membership["a"].tolist() == [False, True, False, False, False, False, True, False]
    assert membership["b"].tolist() == [True] + [False] * 7
    assert membership.dtypes.eq(bool).all()
    assert groups_from_column([]).shape == (0, 0)


def test_bias_module_re_exports_identity():
    assert bias.Lexicon is Lexicon and bias.assign_groups is assign_groups
    assert bias.load_gender_lexicon is identity.load_gender_lexicon


# --- swaps --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gender() -> Lexicon:
    return load_lexicons(["gender"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The theme is tired", None),
        ("She loved her husband", "He loved his wife"),
        ("SHE IS HERE", "HE IS HERE"),
        ("he said he loved his mother", "she said she loved her father"),
        ("I saw her.", "I saw him."),  # "her" before punctuation: object
        ("I gave her the book", "I gave him the book"),  # before a function word
        ("Let her go", "Let him go"),
        ("in her own way", "in his own way"),  # before a content word: possessive
        ("The book is hers, not his", "The book is his, not her"),
        ("Ask him", "Ask her"),
        ("The Twin Sister and my ex-girlfriend", "The Twin Brother and my ex-boyfriend"),
        ("She's the Queen's niece", "He's the King's nephew"),
        ("Men in Black and the men", "Men in Black and the women"),  # exclusion left alone
        ("Mary met John", "John met Mary"),
    ],
)
def test_gender_swaps_keep_case_and_whole_words(text: str, expected: str | None, gender: Lexicon):
    assert swap_terms(text, gender) == expected


@pytest.mark.parametrize(
    "text",
    [
        "She is a woman",
        "The girl and her mother",
        "Mary met John",
        "HE hurt himself",
        "Boys will be boys, said the father",
        "She saw him",
    ],
)
def test_definitional_swaps_round_trip(text: str, gender: Lexicon):
    once = swap_terms(text, gender)
    assert once is not None and once != text
    assert swap_terms(once, gender) == text


def test_name_swaps_across_the_sets():
    race, age = load_lexicons(["race"]), load_lexicons(["age"])
    assert swap_terms("Emily met Jamal", race) == "Yvette met Brett"
    assert swap_terms("Emily met Jamal", age) is None
    assert swap_terms("Frank and Jack", race) is None  # dropped names
    assert swap_terms("Tyrone", race) == "Jonathan"  # first of its two pairs
    assert swap_terms("Brad", age) == "Cecil"
    # Merged, the earlier lexicon's partner wins for a name in two.
    assert swap_terms("Brad", load_lexicons(["race", "age"])) == "Lamont"
    assert swap_terms("Brad", load_lexicons(["age", "race"])) == "Cecil"


def test_religion_swaps():
    religion = load_lexicons(["religion"])
    assert swap_terms("A Christian and two Jews", religion) == "A Muslim and two Christians"
    assert swap_terms("Muslims and a Catholic", religion) == "Christians and a Protestant"
    assert swap_terms("Christian Bale", religion) is None


def test_counterfactual_pairs(gender: Lexicon):
    texts = ["The theme", "She wins", "", "Nobody", "HIS film"]
    assert counterfactual_pairs(texts, gender) == [
        (1, "She wins", "He wins"),
        (4, "HIS film", "HER film"),
    ]


def test_swaps_of_a_hand_made_lexicon():
    lexicon = Lexicon(
        {"a": frozenset({"cat"}), "b": frozenset({"dog", "big dog"})},
        swaps=(("cat", "dog"), ("cat", "big dog")),
    )
    assert lexicon.partners() == {"cat": "dog", "dog": "cat", "big dog": "cat"}
    assert swap_terms("Big Dog chased a cat; catalog", lexicon) == "Cat chased a dog; catalog"


# --- CrowS-Pairs --------------------------------------------------------------------------------


def test_crows_pairs_loader():
    pairs = load_crows_pairs()
    assert list(pairs.columns) == ["bias_type", "sent_a", "sent_b"]
    assert len(pairs) == 1018
    assert pairs["bias_type"].value_counts().to_dict() == {
        "race-color": 367,
        "gender": 127,
        "nationality": 117,
        "socioeconomic": 109,
        "religion": 92,
        "sexual-orientation": 68,
        "age": 59,
        "physical-appearance": 48,
        "disability": 31,
    }
    assert not pairs["sent_a"].str.contains(r"\[MASK\]").any()
    assert (pairs["sent_a"] != pairs["sent_b"]).all()
    assert pairs.loc[2, "sent_a"].endswith("whether he would come forward.")
    assert pairs.loc[2, "sent_b"].endswith("whether she would come forward.")


def test_crows_pairs_loader_checks_the_file(tmp_path: Path):
    path = tmp_path / "c.csv"
    path.write_text(",bias_type,sentence,mask1\n0,age,[MASK] is old,He\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"columns \['mask2'\] missing"):
        load_crows_pairs(path)
    path.write_text(",bias_type,sentence,mask1,mask2\n0,age,[MASK] [MASK],a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows \[0\] do not have exactly one \[MASK\]"):
        load_crows_pairs(path)
    path.write_text(
        ",bias_type,sentence,mask1,mask2\n0,age,[MASK] is old,He,She\n", encoding="utf-8"
    )
    assert load_crows_pairs(path).to_dict("records") == [
        {"bias_type": "age", "sent_a": "He is old", "sent_b": "She is old"}
    ]
