"""The config dataclasses are the single source: schema, reference and objects derive from them."""

from __future__ import annotations

import dataclasses

import jsonschema
import pytest
import yaml

from rlhf_launch.core import config, schema
from rlhf_launch.frontend import generated
from tests.conftest import SPECS


def test_committed_schema_and_readme_match_the_dataclasses():
    stale = generated.stale_files()
    assert not stale, f"regenerate with `rlhf-launch schema`: {stale}"


def test_every_key_is_documented():
    undocumented = [k.path for k in schema.iter_keys() if len(k.doc) < 10]
    assert not undocumented


def test_schema_is_valid_json_schema_and_closed():
    s = schema.job_schema()
    jsonschema.Draft202012Validator.check_schema(s)
    for name, definition in s["$defs"].items():
        assert definition["additionalProperties"] is False, name


@pytest.mark.parametrize("spec_file", SPECS, ids=lambda p: p.name)
def test_shipped_specs_validate_against_the_schema(spec_file):
    data = yaml.safe_load(spec_file.read_text())
    jsonschema.validate(data, schema.job_schema())


def test_from_dict_round_trips_a_full_spec():
    data = yaml.safe_load((SPECS[0].parent / "llama2_7b_vllm.yaml").read_text())
    spec = schema.from_dict(config.JobSpec, data)
    assert schema.from_dict(config.JobSpec, spec.to_dict()) == spec
    assert spec.model_configs.actor.generator_config.parallel.tensor.size == 2
    assert isinstance(spec.model_configs.actor.trainer_config.train_kwargs, config.TrainKwargs)


def test_from_dict_fills_defaults_and_converts_integral_floats():
    spec = schema.from_dict(config.JobSpec, {"train_config": {"max_train_step": 1e3}, "repeater_config": {"gamma": 1}})
    assert spec.train_config.max_train_step == 1000 and isinstance(spec.train_config.max_train_step, int)
    assert spec.repeater_config.gamma == 1.0 and isinstance(spec.repeater_config.gamma, float)
    assert spec.rollout_config == config.RolloutConfig()


def test_schema_defaults_equal_dataclass_defaults():
    s = schema.job_schema()
    props = s["$defs"]["RepeaterConfig"]["properties"]
    for f in dataclasses.fields(config.RepeaterConfig):
        assert props[f.name]["default"] == f.default
