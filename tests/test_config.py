"""Config loading: shipped YAMLs load, bad keys/types/values fail naming the key and file."""
from pathlib import Path

import pytest

from xai_lib.config import (
    ConfigError,
    Stage1Config,
    Stage2Config,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    schema = Stage2Config if "stage2" in name else Stage1Config
    cfg = load_config(CONFIGS / name, schema)
    assert isinstance(cfg, schema)


def test_baseline_is_the_real_recipe():
    cfg = load_config(CONFIGS / "conformertcm_baseline.yaml", Stage1Config)
    assert (cfg.model.emb_size, cfg.model.num_encoders, cfg.model.heads, cfg.model.kernel_size) == (144, 4, 4, 31)
    assert cfg.model.ssl.hidden_size == 1024 and cfg.model.ssl.num_hidden_layers == 24
    assert cfg.training.batch_size == 32 and cfg.training.num_epochs == 30
    assert cfg.training.class_weights == [0.1, 0.9]


def test_stage2_seed_config_keeps_the_published_seed_values():
    x = load_config(CONFIGS / "xai_stage2_seed.yaml", Stage2Config).xai
    assert (x.prototype_mode, x.ema_momentum, x.importance_hidden_dim, x.temperature) == ("ema", 0.99, 256, 0.07)
    assert (x.lambda_bonafide_reg, x.lambda_temporal_smooth, x.lambda_sparsity) == (0.1, 0.1, 0.01)


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("training:\n  bach_size: 16\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*training\.bach_size"):
        load_config(p, Stage1Config)


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("training:\n  batch_size: sixteen\n")
    with pytest.raises(ConfigError, match=r"training\.batch_size.*integer"):
        load_config(p, Stage1Config)


@pytest.mark.parametrize(
    "override,schema,match",
    [
        ("training.lr=-0.1", Stage1Config, "training.lr"),
        ("training.lr_schedule=linear", Stage1Config, "training.lr_schedule"),
        ("training.warmup_epochs=-1", Stage1Config, "training.warmup_epochs"),
        ("training.min_lr_ratio=2", Stage1Config, "training.min_lr_ratio"),
        ("training.dev_last_epochs=0", Stage1Config, "training.dev_last_epochs"),
        ("training.decay_epochs=0", Stage1Config, "training.decay_epochs"),
        ("xai.temperature=0", Stage2Config, "xai.temperature"),
        ("xai.prototype_mode=median", Stage2Config, "prototype_mode"),
        ("model.emb_size=145", Stage1Config, "emb_size"),
    ],
)
def test_out_of_range_values(override, schema, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, schema, [override])


def test_dotted_overrides_and_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", Stage1Config, ["training.batch_size=4", "model.ssl.num_hidden_layers=1"])
    assert cfg.training.batch_size == 4 and cfg.model.ssl.num_hidden_layers == 1
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out, Stage1Config)
    assert again == cfg


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope/missing.yaml", Stage1Config)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, Stage1Config, ["training.batch_size"])


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "lr.yaml"
    p.write_text("training:\n  lr: 1e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(p, Stage1Config).training.lr == 1e-4


def test_save_config_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    from xai_lib.config import Stage2Config, load_config, save_config

    path = tmp_path / "run" / "config_stage2.yaml"
    path.parent.mkdir()
    path.write_text("old: content\n")
    cfg = load_config({"training": {"batch_size": 7}}, Stage2Config)
    save_config(cfg, path)
    assert load_config(path, Stage2Config).training.batch_size == 7
    assert [p.name for p in path.parent.iterdir()] == ["config_stage2.yaml"]
