"""Config: unknown or mistyped keys fail naming the key; dvc.yaml, params.yaml and code agree."""

import pytest
import yaml

from ratchet.config import Params, dump_defaults, load_params, parse_params
from ratchet.errors import ConfigError
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"prepare": {"tset_frac": 0.1}},
            "`prepare.tset_frac`: unknown key (did you mean `test_frac`?)",
        ),
        ({"valdate": {}}, "`valdate`: unknown key (did you mean `validate`?)"),
        ({"finetune": {"epochs": "three"}}, "`finetune.epochs`"),
        ({"gate": {"min_score": 1.5}}, "`gate.min_score`"),
        ({"augment": {"ops": ["swap", "shout"]}}, "`augment.ops.1`"),
        ({"prepare": {"val_frac": 0.5, "test_frac": 0.45}}, "at least 10% for training"),
    ],
)
def test_bad_params_name_the_key(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert expected in str(err.value)


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_params({"prepare": {"tset_frac": 0.1}, "finetune": {"epochs": "x"}})
    assert "tset_frac" in str(err.value) and "finetune.epochs" in str(err.value)


def test_config_is_frozen():
    params = parse_params({})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError
        params.gate.min_delta = 0.5


def test_load_params_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params(tmp_path / "params.yaml")


def test_params_yaml_holds_exactly_the_defaults():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw == dump_defaults()


def test_dvc_params_are_params_yaml_keys_are_config_fields():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    fields = {f.alias or name for name, f in Params.model_fields.items()}
    assert set(raw) <= fields
    for name, stage in dvc["stages"].items():
        for key in stage.get("params", []):
            section, _, sub = key.partition(".")
            assert section in raw, f"stage {name} reads unknown params section {section}"
            if sub:
                assert sub in raw[section], f"stage {name} reads unknown key {key}"
