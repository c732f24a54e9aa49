"""Config loading: YAML + overrides, unknown keys, bad values, and every shipped config."""

from __future__ import annotations


import pytest

from lora_dpo.config import Config, all_keys, config_reference_markdown, field_docs, load_config, parse_override
from lora_dpo.errors import ConfigError

from conftest import REPO

REQUIRED = ["model.name_or_path=m", "data.train_file=t.jsonl"]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: base\ndata:\n  train_file: a.jsonl\ntrain:\n  learning_rate: 1e-4\n")
    config = load_config(path, ["train.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "dpo.beta=0.25",
                                "model.init_adapter=null", "output.dir=out dir"])
    assert config.model.name_or_path == "base"
    assert config.train.learning_rate == 1e-4  # YAML reads '1e-4' as a string; the float field converts it
    assert config.train.max_steps == 7
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.dpo.beta == 0.25
    assert config.model.init_adapter is None
    assert config.output.dir == "out dir"


@pytest.mark.parametrize("item,expected", [
    ("train.seed=3", ("train.seed", 3)),
    ("dpo.beta=0.5", ("dpo.beta", 0.5)),
    ("model.load_in_4bit=false", ("model.load_in_4bit", False)),
    ("output.dir=runs/x", ("output.dir", "runs/x")),
    ("lora.target_modules=[a,b]", ("lora.target_modules", ["a", "b"])),
])
def test_parse_override(item, expected):
    assert parse_override(item) == expected


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(None, ["train.seed"])


def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ntrain:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:4: unknown key train.lerning_rate (did you mean train.learning_rate?)"
    with pytest.raises(ConfigError, match=r"command-line override: unknown key train.beta \(did you mean dpo.beta\?\)"):
        load_config(None, REQUIRED + ["train.beta=0.1"])
    with pytest.raises(ConfigError, match=r"command-line override: unknown key trian \(did you mean train\?\)"):
        load_config(None, REQUIRED + ["trian.seed=1"])


@pytest.mark.parametrize("override,message", [
    ("train.learning_rate=fast", "train.learning_rate: expected a number, got 'fast'"),
    ("train.micro_batch_size=2.5", "train.micro_batch_size: expected an integer or one of auto, got 2.5"),
    ("model.load_in_4bit=yes please", "model.load_in_4bit: expected true or false"),
    ("train.optim=sgd", "train.optim: must be one of adamw, paged_adamw_8bit; got 'sgd'"),
    ("dpo.beta=-1", "dpo.beta must be positive"),
    ("dpo.label_smoothing=0.5", r"dpo.label_smoothing must be in \[0, 0.5\)"),
    ("data.max_prompt_length=2000", "data.max_prompt_length must be positive and below data.max_length"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be positive"),
    ("lora.target_modules=7", "lora.target_modules: expected a string or a list of a string"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, REQUIRED + [override])


def test_missing_required_fields():
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        load_config(None, ["data.train_file=x.jsonl"])
    with pytest.raises(ConfigError, match="data.train_file is required"):
        load_config(None, ["model.name_or_path=m"])


def test_bad_yaml_reports_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\n  bad: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(None, REQUIRED + ["train=3"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.model.name_or_path and config.data.train_file


def test_every_field_is_documented_and_in_the_reference():
    reference = config_reference_markdown()
    for key in all_keys():
        section, name = key.split(".")
        cls = type(getattr(Config(), section))
        assert field_docs(cls).get(name), f"{key} has no docstring"
        assert f"`{key}`" in reference
    docs = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert reference.strip() in docs, "docs/config.md is stale: regenerate with `lora-dpo config --reference`"


def test_resolved_config_round_trips(tmp_path):
    from lora_dpo.config import save_config

    config = load_config(None, REQUIRED + ["train.max_steps=5", "lora.target_modules=[q_proj]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
