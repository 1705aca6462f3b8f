from pathlib import Path

import pytest

from curation.config import CurateConfig
from pipelines.config import ConfigError, flatten, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_file_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shots:\n  min_seconds: 3\n  max_seconds: 8\nmotion:\n  fps: 4\n")
    config = load_config(CurateConfig, path, ["shots.min_seconds=2.5", "decode.backends=[pyav]"])
    assert config.shots.min_seconds == 2.5  # --set wins over the file
    assert config.shots.max_seconds == 8.0 and isinstance(config.shots.max_seconds, float)
    assert config.motion.fps == 4.0
    assert config.decode.backends == ["pyav"]
    assert config.decode.work_short_side == 256  # untouched default


@pytest.mark.parametrize("override, key", [
    ("shots.min_secnds=2", "shots.min_secnds"),
    ("shots.min_seconds=two", "shots.min_seconds"),
    ("decode.threads=1.5", "decode.threads"),
    ("filters.motion.min=maybe", "filters.motion.min"),
    ("motion=3", "motion"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(CurateConfig, None, [override])
    assert key in str(err.value)


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shots:\n  cut_thresh: 3\n")
    with pytest.raises(ConfigError, match="shots.cut_thresh"):
        load_config(CurateConfig, path)


def test_shipped_config_matches_the_dataclasses_and_round_trips(tmp_path):
    config = load_config(CurateConfig, ROOT / "configs" / "curate.yaml")
    again = tmp_path / "resolved.yaml"
    again.write_text(to_yaml(config))
    assert load_config(CurateConfig, again) == config
    assert flatten(config)["shots.min_seconds"] == config.shots.min_seconds


def test_the_demo_configs_spell_out_the_embedded_defaults():
    # Both files say they are what `reelforge run` / `reelforge train` do with no config: keep them from drifting.
    from pipelines.workflow import WorkflowConfig
    from training.config import TrainConfig

    quickstart = flatten(load_config(WorkflowConfig, ROOT / "configs" / "quickstart.yaml"))
    embedded = flatten(WorkflowConfig())
    assert {k: v for k, v in quickstart.items() if embedded[k] != v} == {}
    demo = flatten(load_config(TrainConfig, ROOT / "configs" / "train" / "demo.yaml"))
    train_embedded = flatten(TrainConfig())
    assert {k: v for k, v in demo.items() if train_embedded[k] != v} == {}
    assert demo["schedule.logsnr_shift"] < 0 and demo["data_loading.windows_per_clip"] == 1
