"""The typed config: defaults, YAML files, key.path=value overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    RetuneConfig,
    apply_overrides,
    describe_config,
    load_config,
)

REPO_CONFIG = Path(__file__).parents[1] / "retune.yaml"


def test_defaults_load_without_a_file():
    config = load_config()
    assert config == RetuneConfig()
    assert config.data.source == "example"
    assert config.data.labels == ["fresh", "rotten"]
    assert config.data.validation_fraction == 0.15 and config.data.test_fraction == 0.15
    assert config.train.strategy == "partial"
    assert config.train.frozen_layers == 3
    assert config.train.epochs == 2
    assert config.validation.min_text_chars == 3
    assert config.validation.max_text_chars == 1_000_000
    assert config.validation.max_truncated_share == 1.0 and config.data.max_text_bytes == 1_000_000
    assert config.bias.min_group_rows == 30
    assert config.registry.primary_metric == "macro_f1"


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(ValueError, match="frozen"):
        config.train.epochs = 5  # type: ignore[misc]


def test_apply_overrides_parses_yaml_scalars_and_lists():
    raw = {"train": {"epochs": 2}, "data": {"source": "example"}}
    out = apply_overrides(
        raw,
        ["train.epochs=3", "train.learning_rate=1.0e-4", "data.labels=[a, b]", "train.seed=null"],
    )
    assert out["train"] == {"epochs": 3, "learning_rate": 1e-4, "seed": None}
    assert isinstance(out["train"]["learning_rate"], float)
    assert out["data"] == {"source": "example", "labels": ["a", "b"]}


def test_apply_overrides_returns_a_copy_and_creates_missing_sections():
    raw = {"train": {"epochs": 2}}
    out = apply_overrides(raw, ["train.epochs=5", "bias.min_group_rows=7"])
    assert raw == {"train": {"epochs": 2}}
    assert out == {"train": {"epochs": 5}, "bias": {"min_group_rows": 7}}


def test_apply_overrides_last_one_wins():
    assert apply_overrides({}, ["train.epochs=3", "train.epochs=4"]) == {"train": {"epochs": 4}}


def test_load_config_applies_overrides_with_types():
    config = load_config(
        overrides=["train.epochs=3", "train.learning_rate=1e-4", "data.labels=[a, b]"]
    )
    assert config.train.epochs == 3
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert isinstance(config.train.learning_rate, float)
    assert config.data.labels == ["a", "b"]
    # Untouched keys keep their defaults.
    assert config.train.frozen_layers == 3


def test_overrides_apply_on_top_of_a_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 5\n  seed: 7\n", encoding="utf-8")
    config = load_config(path, ["train.epochs=1"])
    assert config.train.epochs == 1
    assert config.train.seed == 7


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.epochz=3", "train.epochz"), ("trian.epochs=3", "trian")],
)
def test_unknown_keys_are_rejected_naming_the_override_and_the_closest_key(override: str, key: str):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    close = {"train.epochz": "train.epochs", "trian": "train"}[key]
    assert str(err.value) == (
        f"invalid config: --set {override}: unknown key {key}; did you mean {close}? "
        "(every key: retune run --help)"
    )


def test_unknown_key_in_a_file_names_the_file_and_key(tmp_path: Path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  learning_rte: 0.1\n", encoding="utf-8")
    with pytest.raises(
        ConfigError,
        match=r"typo\.yaml: unknown key train\.learning_rte; did you mean train\.learning_rate\?",
    ):
        load_config(path)


def test_a_bad_override_is_blamed_on_the_override_not_the_file(tmp_path: Path):
    path = tmp_path / "retune.yaml"
    path.write_text("train:\n  epochs: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.epochs=0"])
    assert str(err.value) == (
        "invalid config: --set train.epochs=0: train.epochs: "
        "Input should be greater than or equal to 1"
    )
    # A section-level check names the --set inside that section, not the file.
    path.write_text("data:\n  labels: [a, b]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^invalid config: --set data\.labels=\[a, a\]: data: "):
        load_config(path, ["data.labels=[a, a]"])


def test_nested_overrides_reach_mappings_and_suggest_known_names():
    config = load_config(overrides=["validation.severity.duplicates=error"])
    assert config.validation.severity == {"duplicates": "error"}
    assert config.validation.severity_of("duplicates") == "error"
    with pytest.raises(
        ConfigError, match=r"unknown checks \['dupes'\] \(did you mean duplicates\?\)"
    ):
        load_config(overrides=["validation.severity.dupes=error"])
    with pytest.raises(ConfigError, match=r"'validation\.min_text_chars' is not a mapping"):
        apply_overrides({"validation": {"min_text_chars": 3}}, ["validation.min_text_chars.x=1"])


@pytest.mark.parametrize("override", ["epochs=3", "train.epochs", "train-epochs=3"])
def test_malformed_override_says_the_expected_shape(override: str):
    expected = rf"override '{override}' must look like section\.key=value, e\.g\. train\.epochs=3"
    with pytest.raises(ConfigError, match=expected):
        apply_overrides({}, [override])


def test_override_into_a_non_section_is_rejected():
    expected = "override 'train.epochs=3': 'train' is not a config section"
    with pytest.raises(ConfigError, match=expected):
        apply_overrides({"train": 5}, ["train.epochs=3"])


def test_missing_config_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        load_config(path)


def test_config_file_must_hold_a_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"list\.yaml must hold a mapping of sections"):
        load_config(path)


def test_empty_config_file_gives_defaults(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n", encoding="utf-8")
    assert load_config(path) == RetuneConfig()


@pytest.mark.parametrize(
    ("override", "field", "why"),
    [
        ("train.epochs=0", "train.epochs", "greater than or equal to 1"),
        ("train.learning_rate=0", "train.learning_rate", "greater than 0"),
        ("train.learning_rate=abc", "train.learning_rate", "valid number"),
        ("train.strategy=none", "train.strategy", "'head', 'partial', 'full', 'lora' or 'lp-ft'"),
        ("data.validation_fraction=0.5", "data.validation_fraction", "less than 0.5"),
        ("registry.primary_metric=loss", "registry.primary_metric", "'token_accuracy' or 'chrf'"),
    ],
)
def test_invalid_values_name_the_field(override: str, field: str, why: str):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    assert message.startswith(f"invalid config: --set {override}: ")
    assert f"{field}: " in message
    assert why in message


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"data: .*two distinct labels, got \['a', 'a'\]"):
        load_config(overrides=["data.labels=[a, a]"])
    with pytest.raises(ConfigError, match="validation_fraction \\+ data.test_fraction must stay"):
        load_config(overrides=["data.validation_fraction=0.4", "data.test_fraction=0.4"])
    with pytest.raises(ConfigError, match="min_text_chars must not exceed"):
        load_config(overrides=["validation.min_text_chars=10", "validation.max_text_chars=5"])


def test_several_problems_are_all_reported():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.epochs=0", "train.batch_size=0"])
    assert "train.epochs: " in str(err.value)
    assert "train.batch_size: " in str(err.value)


def test_the_repository_config_loads():
    config = load_config(REPO_CONFIG)
    assert config.data.source == "example"
    assert config.data.labels == ["fresh", "rotten"]
    assert config.train.base_model == "packaged:all-MiniLM-L6-v2"
    assert config.train.strategy == "partial"
    assert config.train.frozen_layers == 3
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.train.epochs == 2 and config.train.patience == 1
    assert config.registry.model_name is None  # retune-<dataset>: retune-rotten-tomatoes


def test_the_repository_config_takes_overrides():
    config = load_config(REPO_CONFIG, ["train.strategy=full", "train.frozen_layers=0"])
    assert config.train.strategy == "full"
    assert config.train.frozen_layers == 0
    assert config.registry.experiment == "retune"


def test_describe_config_lists_every_key_with_default_and_description():
    text = describe_config()
    lines = text.splitlines()
    assert (
        "train.frozen_layers = 3  partial: embeddings and the first K encoder layers stay frozen."
        in lines
    )
    assert "data.labels = ['fresh', 'rotten']  The allowed labels, in order." in lines
    assert "train.epochs = 2" in lines
    assert any(line.startswith("registry.primary_metric = 'macro_f1'") for line in lines)
    n_fields = sum(
        len(getattr(section.annotation, "model_fields", [None]))
        for section in RetuneConfig.model_fields.values()
    )
    assert len(lines) == n_fields
    assert lines[0].startswith("task = 'text-classification'  The kind of fine-tuning task")
    assert lines[1].startswith("data.source = 'example'")
    # Defaults built by a factory show their value, not pydantic's placeholder.
    assert "PydanticUndefined" not in text
    assert any(line.startswith("validation.severity = {}") for line in lines)


def test_scientific_override_parses_as_float_and_bad_yaml_is_a_config_error():
    assert apply_overrides({}, ["train.learning_rate=1e-4"]) == {"train": {"learning_rate": 1e-4}}
    with pytest.raises(
        ConfigError, match=r"override 'data.labels=\[a, b': value is not valid YAML"
    ):
        apply_overrides({}, ["data.labels=[a, b"])


def test_broken_yaml_file_and_empty_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("train:\n", encoding="utf-8")
    assert load_config(empty, ["train.epochs=5"]).train.epochs == 5


def test_the_model_name_defaults_to_the_dataset_name():
    from pipeline.registry import model_name

    assert load_config(REPO_CONFIG).registry.model_name is None
    assert model_name(load_config(REPO_CONFIG)) == "retune-rotten-tomatoes"
    news = load_config(None, ["data.source=bbc-news.csv", "data.labels=[business, sport]"])
    assert model_name(news) == "retune-bbc-news"
    named = load_config(None, ["data.source=x.csv", "data.name=topics"])
    assert model_name(named) == "retune-topics"
    chosen = load_config(REPO_CONFIG, ["registry.model_name=retune-sentiment"])
    assert model_name(chosen) == "retune-sentiment"


def test_task_is_a_top_level_key_that_defaults_to_text_classification():
    assert RetuneConfig().task == "text-classification"
    assert load_config(None, ["task=text-classification"]).task == "text-classification"
    with pytest.raises(ConfigError, match=r"--set task=poem: task: Input should be"):
        load_config(None, ["task=poem"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["epochs=3"])  # only known top-level keys stand alone


def test_a_generative_task_brings_its_own_defaults_under_what_the_user_sets():
    chat = load_config(None, ["task=chat", "train.epochs=1"])
    assert chat.train.base_model == "packaged:SmolLM2-135M-Instruct"
    assert (chat.train.strategy, chat.train.epochs) == ("lora", 1)  # the user's value wins
    assert chat.train.lora_target_modules == ["q_proj", "v_proj"]
    assert chat.registry.primary_metric == "token_accuracy"
    translation = load_config(None, ["task=translation", "train.strategy=full"])
    assert (translation.train.strategy, translation.registry.primary_metric) == ("full", "chrf")
    assert RetuneConfig().train.strategy == "partial"  # text classification keeps its own
    with pytest.raises(ConfigError, match=r"primary_metric=macro_f1 is not a metric of task chat"):
        load_config(None, ["task=chat", "registry.primary_metric=macro_f1"])
    with pytest.raises(ConfigError, match=r"train.strategy=head does not apply to a generative"):
        load_config(None, ["task=translation", "train.strategy=head"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.fsdp=true", "train.nproc_per_node=2"], "train.fsdp is built for chat and"),
        (["task=chat", "train.fsdp=true"], r"set train.nproc_per_node >= 2"),
        (["task=chat", "train.fsdp=true", "train.nproc_per_node=2"], "strategy=lora is not built"),
        (
            [
                "task=chat",
                "train.fsdp=true",
                "train.nproc_per_node=2",
                "train.strategy=full",
                "forgetting.distill=1.0",
            ],
            "not built for train.fsdp yet",
        ),
    ],
)
def test_fsdp_is_refused_where_it_is_not_built(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_a_generative_task_takes_kl_distillation_wise_ft_and_torchrun():
    config = load_config(
        overrides=[
            "task=chat",
            "train.strategy=full",
            "forgetting.distill=1.0",
            "forgetting.wise_ft=true",
            "train.nproc_per_node=2",
            "train.fsdp=false",
        ]
    )
    assert config.forgetting.distill == 1.0 and config.forgetting.distill_batch_size == 8
    assert config.forgetting.wise_ft and config.train.nproc_per_node == 2
