"""StepOptions (the options every step shares) and the op glue's view of the step schemas."""
import pytest
import torch

import ddpm_fast
from ddpm_fast.backends._op_glue import STEPS
from ddpm_fast.step_options import StepOptions


def test_defaults_are_the_public_defaults_and_plain_types():
    import inspect
    sig = inspect.signature(ddpm_fast.ddpm_step)
    for name in StepOptions.SCHEMA_ORDER:
        assert getattr(StepOptions(), name) == sig.parameters[name].default, name
    o = StepOptions(clip_sample=1, clip_sample_range=2, guidance_scale=3)
    assert o.clip_sample is True and type(o.clip_sample_range) is float and type(o.guidance_scale) is float
    with pytest.raises(Exception):
        o.clip_sample = False  # frozen


def test_from_config_mapping_and_attributes_and_schema_round_trip():
    cfg = dict(clip_sample=False, clip_sample_range=1.5, thresholding=True, dynamic_thresholding_ratio=0.9,
               sample_max_value=2.5, unrelated=7)
    o = StepOptions.from_config(cfg, guidance_scale=4.0)
    assert o == StepOptions(False, 1.5, True, 0.9, 2.5, 4.0, False)
    s = ddpm_fast.DDPMScheduler(thresholding=True, sample_max_value=3.0)
    p = StepOptions.from_config(s.config)
    assert p.thresholding and p.sample_max_value == 3.0 and p.clip_sample is True
    assert StepOptions.from_schema_args(("x", 1, *o.schema_args())) == o
    assert "return_x0" not in o.math() and o.math()["guidance_scale"] == 4.0
    # a config without thresholding fields (DDIMInverseScheduler's) takes the defaults
    q = StepOptions.from_config({"clip_sample": False, "clip_sample_range": 2.0})
    assert q == StepOptions(clip_sample=False, clip_sample_range=2.0)
    assert q.clip_options() == dict(clip_sample=False, clip_sample_range=2.0, thresholding=False,
                                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0)


@pytest.mark.parametrize("name", list(STEPS))
def test_step_schemas_are_tensors_own_options_then_step_options(name):
    info = ddpm_fast.backends()["native"]
    if not info["available"]["cpu"]:
        pytest.skip(f"native backend unavailable: {info['reason']}")
    spec = STEPS[name]
    want = list(spec.tensors) + list(spec.own) + list(StepOptions.SCHEMA_ORDER)
    assert [a.name for a in getattr(torch.ops.ddpm_fast, name).default._schema.arguments] == want
    assert [a.name for a in getattr(torch.ops.ddpm_fast, name + "_out").default._schema.arguments] == want + ["out"]
