"""Loading, normalising, splitting and writing task data."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from pipeline.config import DataConfig
from pipeline.data import (
    COLUMNS,
    SPLITS,
    DataError,
    drop_cross_split_duplicates,
    load_example,
    normalise_table,
    prepare_frames,
    read_splits,
    read_table,
    split_by_group,
    subsample,
    write_splits,
)

# --- split_by_group -----------------------------------------------------------------------------


def groups_frame(n_groups: int, rows_per_group: int = 1) -> pd.DataFrame:
    rows = [
        {"text": f"text {g}-{r}", "label": "fresh" if (g + r) % 2 else "rotten", "group": f"g{g}"}
        for g in range(n_groups)
        for r in range(rows_per_group)
    ]
    return pd.DataFrame(rows)


def test_split_by_group_is_pinned_for_known_groups():
    # The md5 split must be the same on every machine and release; these are fixed values.
    frame = pd.DataFrame(
        {"text": list("abcdefgh"), "label": "x", "group": [f"movie-{c}" for c in "abcdefgh"]}
    )
    out = split_by_group(frame, 0.15, 0.15)
    assert out["split"].tolist() == [
        "train",
        "train",
        "train",
        "test",
        "train",
        "validation",
        "validation",
        "train",
    ]
    wider = split_by_group(frame, 0.3, 0.3)
    assert wider["split"].tolist() == [
        "train",
        "train",
        "validation",
        "test",
        "validation",
        "test",
        "test",
        "train",
    ]


def test_split_by_group_adds_a_column_and_leaves_the_input_alone():
    frame = groups_frame(10)
    before = frame.copy()
    out = split_by_group(frame, 0.15, 0.15)
    assert_frame_equal(frame, before)
    assert list(out.columns) == ["text", "label", "group", "split"]
    assert set(out["split"]) <= set(SPLITS)


def test_split_by_group_is_deterministic_and_independent_of_row_order():
    frame = groups_frame(300, rows_per_group=3)
    first = split_by_group(frame, 0.15, 0.15)
    again = split_by_group(frame, 0.15, 0.15)
    assert first["split"].tolist() == again["split"].tolist()

    shuffled = split_by_group(frame.sample(frac=1, random_state=1), 0.15, 0.15)
    by_text = dict(zip(first["text"], first["split"], strict=True))
    assert {t: s for t, s in zip(shuffled["text"], shuffled["split"], strict=True)} == by_text


def test_no_group_lands_in_two_splits():
    out = split_by_group(groups_frame(500, rows_per_group=4), 0.15, 0.15)
    splits_per_group = out.groupby("group")["split"].nunique()
    assert splits_per_group.max() == 1
    assert len(splits_per_group) == 500


def test_split_fractions_are_roughly_respected_on_2000_groups():
    out = split_by_group(groups_frame(2000), 0.15, 0.15)
    share = out["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.70, abs=0.03)
    assert share["validation"] == pytest.approx(0.15, abs=0.03)
    assert share["test"] == pytest.approx(0.15, abs=0.03)

    other = split_by_group(groups_frame(2000), 0.10, 0.30)
    share = other["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.60, abs=0.03)
    assert share["validation"] == pytest.approx(0.10, abs=0.03)
    assert share["test"] == pytest.approx(0.30, abs=0.03)


def test_growing_a_fraction_only_moves_groups_out_of_train():
    # Thresholds on one hash: a group in validation/test stays out of train with bigger fractions.
    frame = groups_frame(1000)
    small = split_by_group(frame, 0.10, 0.10)["split"]
    large = split_by_group(frame, 0.20, 0.20)["split"]
    assert not ((small != "train") & (large == "train")).any()
    assert (small == "test").sum() < (large == "test").sum()


# --- drop_cross_split_duplicates ----------------------------------------------------------------


def test_drop_cross_split_duplicates_hand_case():
    frame = pd.DataFrame(
        {
            "text": ["a", "b", "a", "a", "c", "d", "c", "b", "e", None],
            "label": ["x"] * 10,
            "group": [f"g{i}" for i in range(10)],
            "split": ["train"] * 3 + ["validation"] * 3 + ["test"] * 4,
        }
    )
    kept, dropped = drop_cross_split_duplicates(frame)
    # validation "a" (in train), test "c" (in validation) and test "b" (in train) go.
    assert dropped == 3
    assert kept["text"].tolist()[:6] == ["a", "b", "a", "c", "d", "e"]
    assert pd.isna(kept["text"].iloc[6])
    assert kept["split"].tolist() == ["train"] * 3 + ["validation"] * 2 + ["test"] * 2
    assert kept["group"].tolist() == ["g0", "g1", "g2", "g4", "g5", "g8", "g9"]
    assert kept.index.tolist() == list(range(7))


def test_drop_cross_split_duplicates_without_overlap_drops_nothing():
    frame = split_by_group(groups_frame(50), 0.15, 0.15)
    kept, dropped = drop_cross_split_duplicates(frame)
    assert dropped == 0
    assert_frame_equal(kept, frame.reset_index(drop=True))


# --- read_table ---------------------------------------------------------------------------------


def test_read_table_missing_file(tmp_path: Path):
    path = tmp_path / "absent.csv"
    with pytest.raises(
        DataError, match=r"file .*absent\.csv does not exist; point data\.source at"
    ):
        read_table(path)


def test_read_table_empty_file(tmp_path: Path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"data file .*empty\.csv is empty"):
        read_table(path)


def test_read_table_header_only(tmp_path: Path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"header\.csv has no data rows"):
        read_table(path)


def test_read_table_unknown_suffix(tmp_path: Path):
    path = tmp_path / "data.txt"
    path.write_text("text,label\nhi,a\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"data\.txt: unknown type '\.txt'; use \.csv, \.jsonl or \.parquet"
    ):
        read_table(path)


def test_read_table_folder(tmp_path: Path):
    with pytest.raises(DataError, match="is a folder; point data.source at a file"):
        read_table(tmp_path)


def test_read_table_keeps_strings_as_given(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"NA",007\n"a, b",1\n', encoding="utf-8")
    frame = read_table(path)
    assert frame["text"].tolist() == ["NA", "a, b"]
    assert frame["label"].tolist() == ["007", "1"]


def test_read_table_compressed_csv_jsonl_and_parquet(tmp_path: Path):
    gz = tmp_path / "d.csv.gz"
    gz.write_bytes(gzip.compress(b"text,label\nhello,a\n"))
    assert read_table(gz).to_dict("records") == [{"text": "hello", "label": "a", "_line": 2}]

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "hi", "label": 1}\n{"text": "yo", "label": 0}\n', encoding="utf-8")
    assert read_table(jsonl)["label"].tolist() == [1, 0]

    parquet = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["p", "q"], "label": ["a", "b"]}).to_parquet(parquet)
    assert read_table(parquet)["text"].tolist() == ["p", "q"]


def test_read_table_unreadable_file(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 1 is not valid JSON"):
        read_table(path)


# --- normalise_table ----------------------------------------------------------------------------


def test_missing_text_column_names_file_columns_found_and_the_setting():
    frame = pd.DataFrame({"sentence": ["hi"], "sentiment": ["a"]})
    path = Path("data/in.csv")
    with pytest.raises(DataError) as err:
        normalise_table(frame, DataConfig(label_column="sentiment"), path)
    assert str(err.value) == (
        "column 'text' missing in data/in.csv; found: sentence, sentiment. "
        "Set data.text_column to the column holding the text."
    )


def test_missing_group_column_names_the_setting():
    frame = pd.DataFrame({"text": ["hi"], "label": ["a"]})
    with pytest.raises(DataError, match=r"column 'movie' missing .*Set data\.group_column"):
        normalise_table(frame, DataConfig(group_column="movie"), Path("x.csv"))


def test_int_labels_become_strings():
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 1]})
    out = normalise_table(frame, DataConfig(), Path("x.jsonl"))
    assert out["label"].tolist() == ["0", "1", "1"]


def test_float_labels_from_missing_values_become_int_strings_and_none():
    # A missing label turns an int column into floats: 1.0 must still read "1".
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [1.0, float("nan"), 0.0]})
    out = normalise_table(frame, DataConfig(), Path("x.jsonl"))
    assert out["label"].iloc[0] == "1" and out["label"].iloc[2] == "0"
    assert pd.isna(out["label"].iloc[1])


def test_normalise_renames_columns_and_uses_text_as_group_by_default():
    frame = pd.DataFrame({"review": ["good", 5], "stars": ["pos", "neg"], "extra": [1, 2]})
    out = normalise_table(frame, DataConfig(text_column="review", label_column="stars"), Path("x"))
    assert list(out.columns) == ["text", "label", "group"]
    # Non-string text becomes missing (validation then flags it); group falls back to the text.
    assert out["text"].iloc[0] == "good" and pd.isna(out["text"].iloc[1])
    assert out["label"].tolist() == ["pos", "neg"]
    assert out["group"].iloc[0] == "good"


def test_normalise_with_group_and_split_columns():
    frame = pd.DataFrame(
        {"t": ["a", "b"], "y": ["p", "n"], "movie": [7, 8], "part": ["train", "test"]}
    )
    config = DataConfig(
        text_column="t", label_column="y", group_column="movie", split_column="part"
    )
    out = normalise_table(frame, config, Path("x"))
    assert out.to_dict("records") == [
        {"text": "a", "label": "p", "group": "7", "split": "train"},
        {"text": "b", "label": "n", "group": "8", "split": "test"},
    ]


# --- prepare_frames on a user file --------------------------------------------------------------


def write_user_csv(path: Path, n_movies: int = 60, per_movie: int = 4) -> pd.DataFrame:
    rows = [
        {
            "review": f"review {m}-{r}",
            "stars": "pos" if (m + r) % 3 else "neg",
            "movie": f"movie {m}",
        }
        for m in range(n_movies)
        for r in range(per_movie)
    ]
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False)
    return frame


def test_prepare_frames_user_csv_with_group_column(tmp_path: Path):
    write_user_csv(tmp_path / "reviews.csv")
    config = DataConfig(
        source="reviews.csv", text_column="review", label_column="stars", group_column="movie"
    )
    frames = prepare_frames(config, tmp_path)  # relative source resolves against project_dir
    assert set(frames) == set(SPLITS)
    assert all(list(f.columns) == COLUMNS for f in frames.values())
    assert sum(len(f) for f in frames.values()) == 240
    assert all(len(f) > 0 for f in frames.values())
    groups = [set(frames[s]["group"]) for s in SPLITS]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    # Every movie keeps all 4 of its reviews together.
    counts = pd.concat(frames.values())["group"].value_counts()
    assert set(counts) == {4}
    assert set(pd.concat(frames.values())["label"]) == {"pos", "neg"}


def test_prepare_frames_user_csv_without_group_column_groups_by_text(tmp_path: Path):
    path = tmp_path / "reviews.csv"
    write_user_csv(path)
    config = DataConfig(source=str(path), text_column="review", label_column="stars")
    frames = prepare_frames(config, tmp_path)  # an absolute source inside the project
    for frame in frames.values():
        assert frame["group"].tolist() == frame["text"].tolist()
    assert sum(len(f) for f in frames.values()) == 240


def test_prepare_frames_user_split_column_is_used_as_given(tmp_path: Path):
    path = tmp_path / "d.csv"
    pd.DataFrame(
        {
            "text": ["a", "b", "c", "a", "d", "e"],
            "label": ["p", "n", "p", "n", "p", "n"],
            "part": ["train", "train", "validation", "test", "test", "train"],
        }
    ).to_csv(path, index=False)
    frames = prepare_frames(DataConfig(source=str(path), split_column="part"), tmp_path)
    assert frames["train"]["text"].tolist() == ["a", "b", "e"]
    assert frames["validation"]["text"].tolist() == ["c"]
    # An explicit split is kept as given: the leak of "a" is for validation to flag.
    assert frames["test"]["text"].tolist() == ["a", "d"]


def test_identity_column_is_kept_for_the_bias_checks(tmp_path: Path):
    path = tmp_path / "d.csv"
    pd.DataFrame(
        {
            "text": ["a", "b", "c", "d"],
            "label": ["p", "n", "p", "n"],
            "part": ["train", "train", "validation", "test"],
            "gender": ["female", None, "male", "female"],
        }
    ).to_csv(path, index=False)
    config = DataConfig(source=str(path), split_column="part", identity_column="gender")
    frames = prepare_frames(config, tmp_path)
    assert frames["train"]["identity"].tolist() == ["female", ""]  # no group: empty
    assert frames["test"]["identity"].tolist() == ["female"]
    write_splits(frames, tmp_path / "out")
    assert read_splits(tmp_path / "out")["train"]["identity"].tolist() == ["female", ""]
    with pytest.raises(DataError, match="column 'sex' missing .*Set data.identity_column"):
        prepare_frames(config.model_copy(update={"identity_column": "sex"}), tmp_path)


def test_prepare_frames_bad_split_value(tmp_path: Path):
    path = tmp_path / "d.csv"
    pd.DataFrame(
        {"text": ["a", "b", "c"], "label": ["p", "n", "p"], "part": ["train", "dev", "test"]}
    ).to_csv(path, index=False)
    with pytest.raises(
        DataError,
        match=r"column 'part' \(data\.split_column\) holds \['dev'\]; allowed: train, valid",
    ):
        prepare_frames(DataConfig(source=str(path), split_column="part"), tmp_path)


def test_prepare_frames_missing_source(tmp_path: Path):
    with pytest.raises(DataError, match=r"missing\.csv does not exist"):
        prepare_frames(DataConfig(source="missing.csv"), tmp_path)


# --- write_splits / read_splits ------------------------------------------------------------------


def tricky_frames() -> dict[str, pd.DataFrame]:
    def frame(texts: list[str]) -> pd.DataFrame:
        return pd.DataFrame(
            {"text": texts, "label": ["fresh", "rotten"][: len(texts)], "group": texts}
        )

    return {
        "train": frame(['says "hi", then', "naïve — café"]),
        "validation": frame(["line\nbreak", "NA"]),
        "test": frame(["null", " padded "]),
    }


def test_write_splits_is_byte_identical_and_round_trips(tmp_path: Path):
    frames = tricky_frames()
    first = write_splits(frames, tmp_path / "a")
    second = write_splits(frames, tmp_path / "b" / "nested")
    assert [p.name for p in first] == ["train.csv", "validation.csv", "test.csv"]
    for p, q in zip(first, second, strict=True):
        assert p.read_bytes() == q.read_bytes()
    assert b"\r\n" not in first[0].read_bytes()
    assert first[0].read_bytes().startswith(b"text,label,group\n")

    back = read_splits(tmp_path / "a")
    for split in SPLITS:
        assert_frame_equal(back[split], frames[split])


def test_read_splits_missing_file_says_run_prepare(tmp_path: Path):
    write_splits(tricky_frames(), tmp_path)
    (tmp_path / "validation.csv").unlink()
    with pytest.raises(DataError, match=r"validation\.csv is missing; run the prepare step first"):
        read_splits(tmp_path)


# --- subsample ----------------------------------------------------------------------------------


def test_subsample_is_deterministic_and_a_prefix_of_the_seeded_shuffle():
    frame = groups_frame(40)
    a = subsample(frame, 10, seed=3)
    b = subsample(frame, 10, seed=3)
    assert_frame_equal(a, b)
    assert len(a) == 10 and a["text"].is_unique
    assert a.index.tolist() == list(range(10))
    assert set(a["text"]) <= set(frame["text"])
    # More rows with the same seed extend the same order.
    assert subsample(frame, 20, seed=3)["text"].tolist()[:10] == a["text"].tolist()
    assert subsample(frame, 10, seed=4)["text"].tolist() != a["text"].tolist()


def test_subsample_returns_everything_in_order_when_n_is_none_or_large():
    frame = groups_frame(5)
    assert subsample(frame, None, seed=0) is frame
    assert subsample(frame, 5, seed=0) is frame
    assert subsample(frame, 50, seed=0) is frame


# --- the packaged example -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def example() -> pd.DataFrame:
    return load_example()


@pytest.fixture(scope="module")
def example_frames() -> dict[str, pd.DataFrame]:
    return prepare_frames(DataConfig(), Path("."))


def test_load_example(example: pd.DataFrame):
    assert list(example.columns) == COLUMNS
    assert len(example) == 12_808
    assert set(example["label"]) == {"fresh", "rotten"}
    assert (example["label"] == "fresh").sum() == 7_403
    assert (example["label"] == "rotten").sum() == 5_405
    assert example.index.tolist() == list(range(12_808))
    assert example["group"].nunique() == 508


def test_prepare_frames_on_the_example(example: pd.DataFrame, example_frames):
    _, dropped = drop_cross_split_duplicates(split_by_group(example, 0.15, 0.15))
    sizes = {split: len(example_frames[split]) for split in SPLITS}
    assert sum(sizes.values()) == 12_808 - dropped
    assert dropped == 3
    assert sizes == {"train": 8_893, "validation": 2_094, "test": 1_818}
    assert all(list(f.columns) == COLUMNS for f in example_frames.values())


def test_example_splits_share_no_movie_and_no_evaluation_text_is_in_train(example_frames):
    train, validation, test = (example_frames[s] for s in SPLITS)
    movies = [set(f["group"]) for f in (train, validation, test)]
    assert not movies[0] & movies[1]
    assert not movies[0] & movies[2]
    assert not movies[1] & movies[2]
    train_texts = set(train["text"])
    assert not train_texts & set(test["text"])
    assert not train_texts & set(validation["text"])
    assert not set(validation["text"]) & set(test["text"])


def test_example_round_trips_through_csv(example_frames, tmp_path: Path):
    write_splits(example_frames, tmp_path)
    back = read_splits(tmp_path)
    for split in SPLITS:
        assert_frame_equal(back[split], example_frames[split])


def test_missing_group_value_names_the_file_and_row(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "a", "label": "p", "film": "x"}\n{"text": "b", "label": "n", "film": null}\n',
        encoding="utf-8",
    )
    with pytest.raises(
        DataError, match=r"d\.jsonl: column 'film' is empty in 1 rows \(first at data row 2\)"
    ):
        prepare_frames(DataConfig(source=str(path), group_column="film"), tmp_path)


def test_null_text_in_jsonl_is_kept_for_validation_to_count(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"text": null, "label": "p"}',
                '{"text": 42, "label": "n"}',
                '{"text": "ok", "label": "n"}',
            ]
        ),
        encoding="utf-8",
    )
    frames = prepare_frames(DataConfig(source=str(path)), tmp_path)
    texts = pd.concat(frames.values())["text"].tolist()
    assert [t for t in texts if isinstance(t, str)] == ["ok"]
    assert sum(bool(pd.isna(t)) for t in texts) == 2


# --- any readable path, dropped rows counted, messages in the caller's words -----------------


def test_a_source_outside_the_project_is_read_and_described_by_its_absolute_path(tmp_path: Path):
    from pipeline.data import describe_source, prepare_dataset

    (tmp_path / "elsewhere").mkdir()
    write_user_csv(tmp_path / "elsewhere" / "reviews.csv")
    project = tmp_path / "project"
    project.mkdir()
    config = DataConfig(
        source="../elsewhere/reviews.csv", text_column="review", label_column="stars"
    )
    prepared = prepare_dataset(config, project)
    assert sum(len(f) for f in prepared.frames.values()) == 240 == prepared.rows_read
    assert prepared.dropped == {} and prepared.dropped_lines() == []
    assert describe_source(config, project) == str(tmp_path / "elsewhere" / "reviews.csv")


def test_cross_split_duplicates_are_counted_with_their_reason(tmp_path: Path):
    from pipeline.data import DROP_CROSS_SPLIT, prepare_dataset, split_by_group

    frame = write_user_csv(tmp_path / "reviews.csv")
    splits = split_by_group(frame.rename(columns={"movie": "group"}), 0.15, 0.15)
    train_text = splits.loc[splits["split"] == "train", "review"].iloc[0]
    # Two new movies that land outside train, each quoting a train review (case changed).
    outside = [m for m in (f"new {i}" for i in range(200)) if _split_of(m) != "train"][:2]
    extra = pd.DataFrame(
        {"review": [train_text.upper()] * 2, "stars": ["pos", "neg"], "movie": outside}
    )
    pd.concat([frame, extra]).to_csv(tmp_path / "reviews.csv", index=False)
    config = DataConfig(
        source="reviews.csv", text_column="review", label_column="stars", group_column="movie"
    )
    prepared = prepare_dataset(config, tmp_path)
    assert prepared.rows_read == 242
    assert sum(len(f) for f in prepared.frames.values()) == 240
    assert prepared.dropped == {DROP_CROSS_SPLIT: 2}
    assert prepared.dropped_lines() == [
        "2 rows: cross-split near-duplicate (its text, lower-cased and whitespace folded, "
        "is in an earlier split)"
    ]


def _split_of(group: str) -> str:
    from pipeline.data import split_by_group

    one = pd.DataFrame({"group": [group]})
    return str(split_by_group(one, 0.15, 0.15)["split"].iloc[0])


def test_messages_name_config_keys_by_default_and_the_callers_flags_when_given(tmp_path: Path):
    from pipeline.data import prepare_dataset

    write_user_csv(tmp_path / "reviews.csv")
    config = DataConfig(source="reviews.csv", text_column="reveiw", label_column="stars")
    with pytest.raises(DataError, match=r"Did you mean 'review'\? Set data\.text_column to"):
        prepare_dataset(config, tmp_path)
    with pytest.raises(DataError, match=r"Did you mean 'review'\? Set --text-col to"):
        prepare_dataset(config, tmp_path, {"text_column": "--text-col"})
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\u00e9,a\n".encode("latin-1"))
    latin = DataConfig(source="latin.csv")
    with pytest.raises(DataError, match=r"e\.g\. --set data\.encoding=latin-1$"):
        prepare_dataset(latin, tmp_path)
    with pytest.raises(DataError, match=r"e\.g\. --encoding latin-1$"):
        prepare_dataset(latin, tmp_path, {"encoding": "--encoding"})
