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


def test_the_quickstart_trains_the_demo_and_the_library_defaults_stay_neutral():
    # quickstart.yaml (what `reelforge run` does with no config) and demo.yaml say they are the same training run:
    # keep them from drifting. The demo's tuning lives in those files, not in the dataclass defaults.
    from pipelines.workflow import WorkflowConfig
    from training.config import TrainConfig

    quickstart = load_config(WorkflowConfig, ROOT / "configs" / "quickstart.yaml")
    demo = load_config(TrainConfig, ROOT / "configs" / "train" / "demo.yaml")
    differing = {k: v for k, v in flatten(quickstart.train).items() if flatten(demo)[k] != v}
    assert differing == {}
    assert demo.schedule.logsnr_shift < 0 and len(demo.curriculum) == 2 and len(demo.sampling.prompts) == 4
    library = TrainConfig()
    assert library.schedule.logsnr_shift == 0.0 and library.sampling.prompts == []
    assert len(library.curriculum) == 1 and WorkflowConfig().sample_dump.num_videos < quickstart.sample_dump.num_videos


def test_reelforge_run_without_a_config_runs_the_quickstart_file():
    from pipelines.cli import QUICKSTART

    assert QUICKSTART == ROOT / "configs" / "quickstart.yaml" and QUICKSTART.is_file()
