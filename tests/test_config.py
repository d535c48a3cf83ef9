"""The config object: YAML file, CLI overrides, type coercion and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from longmem.config import LongMemConfig


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("read:\n  segment_tokens: 512\nmemory:\n  capacity_tokens: 4096\n")
    config = LongMemConfig.load(path, ["memory.topk_tokens=32", "train.lr=5e-4", "train.corpora=[essays]"])
    assert config.read.segment_tokens == 512 and config.memory.capacity_tokens == 4096
    assert config.memory.topk_tokens == 32
    assert config.train.lr == 5e-4 and isinstance(config.train.lr, float)
    assert config.train.corpora == ["essays"]
    assert LongMemConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("overrides, message", [
    (["nosuch.key=1"], "unknown config sections"),
    (["memory.nosuch=1"], "unknown keys"),
    (["memory"], "section.key=value"),
    (["train.lr=fast"], "train.lr"),
])
def test_bad_config_is_refused_with_the_key_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        LongMemConfig.load(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["memory.topk_tokens=6"], "topk_tokens"),
    (["memory.capacity_tokens=10"], "capacity_tokens"),
    (["sidenet.init=random"], "sidenet.init"),
    (["memory.sink_tokens=5000"], "sink_tokens"),
])
def test_validation_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        LongMemConfig.load(None, overrides).validate()


@pytest.mark.parametrize("recipe", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_training_recipe_loads_and_validates(recipe):
    config = LongMemConfig.load(recipe).validate()
    assert config.train.steps > 0 and config.train.out_dir.startswith("runs/")
