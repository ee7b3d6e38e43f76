import math

import pytest

from sonic import GenerateOptions, InvalidParameter, load_config, schema


def test_defaults_come_from_config():
    o = GenerateOptions.from_dict({})
    cfg = load_config()["defaults"]
    assert o.fps == cfg["fps"] and o.min_resolution == cfg["min_resolution"] and o.duration is None


def test_valid_values_accepted():
    o = GenerateOptions.from_dict({"fps": 30, "dynamic_scale": 1.5, "seed": 7, "duration": 2.5, "align_mouth": False})
    assert (o.fps, o.dynamic_scale, o.seed, o.duration, o.align_mouth) == (30, 1.5, 7, 2.5, False)


@pytest.mark.parametrize("field,value", [
    ("fps", 9), ("fps", 61), ("min_resolution", 255), ("min_resolution", 1025), ("expand_ratio", -0.1),
    ("expand_ratio", 1.01), ("inference_steps", 0), ("inference_steps", 101), ("dynamic_scale", 0.49),
    ("dynamic_scale", 2.01), ("motion_scale", -0.01), ("motion_scale", 2.01), ("duration", 0),
    ("duration", 10_000), ("fps", 25.5), ("fps", "25"), ("align_mouth", 1), ("smooth_motion", "yes"),
    ("dynamic_scale", math.nan), ("dynamic_scale", math.inf), ("seed", -1), ("fps", True), ("fps", None),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(InvalidParameter) as e:
        GenerateOptions.from_dict({field: value})
    assert e.value.field == field and field in e.value.message


def test_unknown_parameter_rejected():
    with pytest.raises(InvalidParameter) as e:
        GenerateOptions.from_dict({"dynamic_scal": 1.0})
    assert e.value.field == "dynamic_scal" and e.value.code == "invalid_parameter"


def test_not_an_object():
    with pytest.raises(InvalidParameter):
        GenerateOptions.from_dict([1, 2])


def test_options_are_frozen():
    o = GenerateOptions.from_dict({})
    with pytest.raises(Exception):
        o.fps = 30


def test_schema_lists_every_field():
    s = schema()
    assert set(s) == set(GenerateOptions.__dataclass_fields__)
    assert s["fps"]["minimum"] == 10 and s["fps"]["maximum"] == 60 and s["fps"]["default"] == 25
