"""model.attn_implementation: auto lets transformers pick what a family implements (a tiny Gemma 2,
which has no sdpa, loads with eager), and an explicit kernel it lacks names the values that work."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_families import tiny_model

from lora_dpo.config import ModelConfig
from lora_dpo.errors import ConfigError
from lora_dpo.modeling import load_base


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma2")
    tiny_model("gemma2", attn="eager", sliding_window=8).save_pretrained(folder)
    return folder


def test_auto_loads_a_family_without_sdpa_and_says_which_kernel_runs(gemma2_dir, caplog):
    assert ModelConfig().attn_implementation == "auto"
    with caplog.at_level(logging.INFO, logger="lora_dpo.modeling"):
        base = load_base(ModelConfig(name_or_path=str(gemma2_dir)), torch.device("cpu"), torch.float32,
                         attn_implementation="auto")
    assert base.config._attn_implementation == "eager"
    assert "model.attn_implementation=auto: transformers runs Gemma2ForCausalLM with eager attention" in caplog.text


def test_an_explicit_kernel_the_family_lacks_names_the_setting_and_the_values_that_work(gemma2_dir):
    with pytest.raises(ConfigError) as info:
        load_base(ModelConfig(name_or_path=str(gemma2_dir)), torch.device("cpu"), torch.float32,
                  attn_implementation="sdpa")
    message = str(info.value)
    assert info.value.key == "model.attn_implementation"
    assert message == ("model.attn_implementation=sdpa: Gemma2ForCausalLM does not implement sdpa attention. Fix: set "
                       "model.attn_implementation to one of auto, eager, flash_attention_2 (auto lets transformers "
                       "choose)")
    assert "save_pretrained" not in message
