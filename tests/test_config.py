"""The job config validates at the edge with messages that name the field."""

import pytest

from distill3d.config import ConfigError, GenerateConfig


def test_defaults_validate_and_round_trip():
    cfg = GenerateConfig.from_dict({"prompt": "a rubber duck"})
    assert GenerateConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.effective_guidance_scale == 1.0
    sd = GenerateConfig.from_dict({"prompt": "x", "prior": "sd", "method": "esd"})
    assert sd.effective_guidance_scale == 7.5


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"iters": 0}, "iters"),
        ({"resolution": 48}, "resolution"),
        ({"resolution": 0}, "resolution"),
        ({"method": "magic"}, "method"),
        ({"prior": "dalle"}, "prior"),
        ({"lam": 1.5}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"seed": -1}, "seed"),
        ({"prompt": "  "}, "prompt"),
        ({"export": {"texture_size": 1000}}, "texture_size"),
        ({"export": {"texture_size": 0}}, "texture_size"),
        ({"export": {"colour": 1}}, "export"),
        ({"cameras": {"kind": "distribution", "front_bias": -2}}, "front_bias"),
        ({"unknown_knob": 3}, "unknown_knob"),
        ({"t_min": 0.9, "t_max": 0.5}, "t_min"),
        ({"prior": "sd", "method": "esd-exact"}, "esd-exact"),
        ({"iters": True}, "iters"),
    ],
)
def test_bad_values_name_the_field(patch, field):
    with pytest.raises(ConfigError, match=field):
        GenerateConfig.from_dict({"prompt": "a rubber duck", **patch})
