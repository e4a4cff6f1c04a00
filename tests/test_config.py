from __future__ import annotations  # the config module must resolve string annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from afan_harness.config import ConfigError, add_config_arguments, config_to_dict, load_config, save_config


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    steps: int = 5
    nesterov: bool = False


@dataclass
class TrainConfig:
    epochs: int = 200
    optim: OptimConfig = field(default_factory=OptimConfig)
    mask: str = "0011"
    milestones: list[int] = field(default_factory=lambda: [50, 150])
    device: str = "auto"
    eps: Optional[float] = None
    gamma: float | None = 0.5
    mode: Literal["base", "afan", "advprop"] = "base"
    split_size: tuple[int, int] = (45000, 5000)
    sizes: tuple[int, ...] = (32,)
    loss_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")


@dataclass
class OptionalSection:
    optim: Optional[OptimConfig] = None


@dataclass
class NeedsRoot:
    data_root: str
    batch: int = 8


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults():
    cfg = load_config(TrainConfig)
    assert cfg == TrainConfig()
    assert cfg.optim.lr == 0.1


def test_yaml_overrides_only_what_it_names(tmp_path):
    path = write(tmp_path, "epochs: 10\noptim:\n  lr: 0.05\nmode: afan\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.epochs == 10 and cfg.mode == "afan"
    assert cfg.optim.lr == 0.05 and cfg.optim.momentum == 0.9  # untouched sibling stays default


def test_command_line_beats_yaml(tmp_path):
    path = write(tmp_path, "epochs: 10\noptim: {lr: 0.05}\n")
    cfg = load_config(TrainConfig, path, ["epochs=3", "optim.lr=0.2"])
    assert cfg.epochs == 3 and cfg.optim.lr == 0.2


def test_dotted_keys_in_yaml_and_later_section_override(tmp_path):
    path = write(tmp_path, "optim.steps: 7\n")
    cfg = load_config(TrainConfig, path, ["optim={momentum: 0.5}"])
    assert cfg.optim.steps == 7 and cfg.optim.momentum == 0.5


def test_value_parsing_and_int_to_float():
    cfg = load_config(
        TrainConfig,
        overrides=["optim.lr=1", "milestones=[10, 20]", "eps=null", "gamma=null", "split_size=[9,1]",
                   "sizes=[1,2,3]", "loss_weights={a: 1, b: 0.5}", "optim.nesterov=true"],
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.milestones == [10, 20]
    assert cfg.eps is None and cfg.gamma is None
    assert cfg.split_size == (9, 1) and cfg.sizes == (1, 2, 3)
    assert cfg.loss_weights == {"a": 1.0, "b": 0.5}
    assert cfg.optim.nesterov is True


def test_exponent_floats_without_dot(tmp_path):
    path = write(tmp_path, "optim: {lr: 5e-4}\n")
    assert load_config(TrainConfig, path).optim.lr == 5e-4
    assert load_config(TrainConfig, overrides=["eps=2E-3"]).eps == 2e-3


def test_text_that_looks_like_a_number_on_the_command_line():
    # The shell strips quotes, so YAML reads 0011 as a number; a str field keeps the typed text.
    assert load_config(TrainConfig, overrides=["mask=0011"]).mask == "0011"


def test_text_that_looks_like_a_number_in_yaml_hints_at_quoting(tmp_path):
    path = write(tmp_path, "mask: 11\n")
    with pytest.raises(ConfigError, match="quote"):
        load_config(TrainConfig, path)


def test_bool_and_int_are_not_interchangeable():
    with pytest.raises(ConfigError, match="epochs"):
        load_config(TrainConfig, overrides=["epochs=true"])
    with pytest.raises(ConfigError, match="nesterov"):
        load_config(TrainConfig, overrides=["optim.nesterov=1"])
    with pytest.raises(ConfigError, match="lr"):
        load_config(TrainConfig, overrides=["optim.lr=true"])


def test_wrong_type_message_names_key_expected_got_and_source(tmp_path):
    path = write(tmp_path, "epochs: ten\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    message = str(info.value)
    assert "'epochs'" in message and "int" in message and "'ten'" in message and str(path) in message


def test_wrong_container_types_rejected():
    with pytest.raises(ConfigError, match=r"list\[int\]"):
        load_config(TrainConfig, overrides=["milestones=[1, x]"])
    with pytest.raises(ConfigError, match="split_size"):
        load_config(TrainConfig, overrides=["split_size=[1,2,3]"])
    with pytest.raises(ConfigError, match="loss_weights"):
        load_config(TrainConfig, overrides=["loss_weights=[1]"])
    with pytest.raises(ConfigError, match="section of OptimConfig"):
        load_config(TrainConfig, overrides=["optim=3"])


def test_literal_rejection_lists_choices():
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=["mode=fancy"])
    message = str(info.value)
    assert "'fancy'" in message and "command line" in message
    for choice in ("'base'", "'afan'", "'advprop'"):
        assert choice in message


def test_unknown_key_names_key_source_and_closest(tmp_path):
    path = write(tmp_path, "optim:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    message = str(info.value)
    assert "optim.stpes" in message and str(path) in message
    assert "Did you mean 'optim.steps'?" in message
    assert "lr, momentum, steps, nesterov" in message


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=["epoch=3"])
    message = str(info.value)
    assert "'epoch'" in message and "command line" in message and "'epochs'" in message


def test_unknown_key_suggests_the_section_that_has_it():
    with pytest.raises(ConfigError, match="Did you mean 'optim.lr'"):
        load_config(TrainConfig, overrides=["lr=0.1"])


def test_optional_section_is_built_from_its_defaults_when_given():
    assert load_config(OptionalSection).optim is None
    cfg = load_config(OptionalSection, overrides=["optim.steps=2"])
    assert cfg.optim == OptimConfig(steps=2)
    assert load_config(OptionalSection, overrides=["optim.steps=2", "optim=null"]).optim is None


def test_key_below_a_plain_value_is_unknown():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(TrainConfig, overrides=["epochs.x=1"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(TrainConfig, overrides=["epochs"])
    with pytest.raises(ConfigError, match="override"):
        load_config(TrainConfig, overrides=["milestones=[1, 2"])


def test_bad_yaml_files(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(TrainConfig, missing)
    assert str(missing) in str(info.value)
    broken = write(tmp_path, "epochs: [1, 2\n", "broken.yaml")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(TrainConfig, broken)
    listing = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(TrainConfig, listing)
    assert "list.yaml" in str(info.value)


def test_empty_yaml_file_changes_nothing(tmp_path):
    assert load_config(TrainConfig, write(tmp_path, "")) == TrainConfig()


def test_post_init_validation_becomes_config_error():
    with pytest.raises(ConfigError, match="epochs must be positive, got 0"):
        load_config(TrainConfig, overrides=["epochs=0"])


def test_required_field_without_default():
    with pytest.raises(ConfigError, match="data_root"):
        load_config(NeedsRoot)
    assert load_config(NeedsRoot, overrides=["data_root=/data"]).data_root == "/data"


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        TrainConfig,
        overrides=["optim.lr=5e-4", "mask=0101", "eps=0.0078", "mode=advprop", "split_size=[40000,10000]",
                   "loss_weights={sd: 0.3}"],
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(TrainConfig, path) == cfg
    data = yaml.safe_load(path.read_text())
    assert list(data) == list(config_to_dict(cfg)) == [
        "epochs", "optim", "mask", "milestones", "device", "eps", "gamma", "mode", "split_size", "sizes",
        "loss_weights",
    ]
    assert data["split_size"] == [40000, 10000]


def test_add_config_arguments():
    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--config", "f.yaml", "a=1", "b.c=2"])
    assert args.config == "f.yaml" and args.overrides == ["a=1", "b.c=2"]
    args = parser.parse_args([])
    assert args.config is None and args.overrides == []


def test_print_config_shows_every_resolved_key_and_starts_nothing(tmp_path, capsys):
    import yaml
    from Detection import train as det_train
    out = tmp_path / "run"
    assert det_train.main(["--config", "shapes_afan.yaml", "afan.gamma_se=2.0", f"out={out}", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["afan"]["gamma_se"] == 2.0 and printed["model"]["name"] == "fasterrcnn_resnet18_c4"
    assert printed["model"]["rpn_smooth_l1_beta"] is None  # left to the family's default
    assert {"seed", "device", "precision", "optim", "data", "advprop"} <= set(printed)
    assert not out.exists()
