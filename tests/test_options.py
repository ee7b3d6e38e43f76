import math

import pytest

from sonic import GenerateOptions, InvalidParameter, load_config, schema
from sonic.settings import load_settings


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
    ("gaze", "away"), ("gaze", 1), ("gaze", None), ("expression", "Smile"), ("expression", ["smile"]),
    ("expression_scale", 1.01), ("expression_scale", -0.1),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(InvalidParameter) as e:
        GenerateOptions.from_dict({field: value})
    assert e.value.field == field and field in e.value.message


def test_an_out_of_range_value_is_quoted_as_sent():
    with pytest.raises(InvalidParameter) as e:
        GenerateOptions.from_dict({"duration": 300.0000001})
    assert "got 300.0000001" in e.value.message  # not "got 300", which reads as in range


@pytest.mark.parametrize("field,value,shown", [
    ("fps", True, "fps must be a number, got true"), ("gaze", None, "gaze must be one of natural, camera, got null"),
    ("expression", "Smile", 'got "Smile"'), ("seed", 1e300, "seed must be in [0, 4294967295], got 1e+300"),
    ("seed", 10 ** 300, "got 1e+300"), ("dynamic_scale", "x" * 500, 'got "' + "x" * 36 + "..."),
    ("expression_scale", 5, "expression_scale must be in [0, 1], got 5"),  # not 5.0: as sent
    ("dynamic_scale", 10 ** 400, "must be a finite number, got an integer of about 401 digits"),
    ("fps", [10 ** 5000], "fps must be a number, got a list"),
])
def test_a_bad_value_is_quoted_as_its_json_said_it_and_short(field, value, shown):
    """Not "got True", "got None", a 300-digit number or the limit as 4.29497e+09: Python's words."""
    with pytest.raises(InvalidParameter) as e:
        GenerateOptions.from_dict({field: value})
    assert shown in e.value.message and len(e.value.message) < 120, e.value.message


def test_choices_are_accepted_and_published():
    o = GenerateOptions.from_dict({"gaze": "camera", "expression": "smile", "expression_scale": 0.5})
    assert (o.gaze, o.expression, o.expression_scale) == ("camera", "smile", 0.5)
    s = schema()
    assert s["expression"]["type"] == "string" and s["expression"]["enum"] == ["neutral", "smile", "serious"]
    assert s["gaze"]["default"] == "natural" and "enum" not in s["fps"]


def test_an_unknown_parameter_is_named_short():
    with pytest.raises(InvalidParameter) as e:
        GenerateOptions.from_dict({"x" * 5000: 1})
    assert len(e.value.message) < 80 and len(e.value.field) == 40


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


def test_default_settings_agree_with_the_declarations():
    """configs/default.yaml's defaults: the declared names (all but those left unset by
    default), the declared defaults, each within its declared range."""
    from sonic.options import parameters
    declared = parameters()
    cfg = load_config()
    defaults = cfg["defaults"]
    assert set(defaults) == {n for n, p in declared.items() if p.default is not None}
    for name, value in defaults.items():
        p = declared[name]
        assert value == p.default and type(value) is p.type, name
        assert p.check(value, load_settings().limits) == value


def _readme_parameter_rows() -> dict[str, list[str]]:
    from conftest import ROOT
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| name | meaning | range | default |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_readme_parameter_table_matches_the_declarations():
    from sonic.options import parameters
    rows = _readme_parameter_rows()
    assert set(rows) == set(parameters())
    for name, p in parameters().items():
        _, rng, default = rows[name]
        if p.default is None:
            assert default == "audio length", name
        elif p.type is bool:
            assert (default, rng) == (str(p.default).lower(), "bool"), name
        elif p.type is str:
            assert default == p.default and rng == ", ".join(p.choices), name
        else:
            assert p.type(default) == p.default, name
        if p.high_limit:
            assert rng == f"({p.low:g}, {getattr(load_settings().limits, p.high_limit):g}]", name
        lo, sep, hi = rng.partition("-")
        if sep and lo.replace(".", "").isdigit() and hi.replace(".", "").isdigit():
            assert (float(lo), float(hi)) == (p.low, p.high), name
