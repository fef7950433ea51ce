import json

import pytest

from llmsqueeze import LlmsqueezeError, QuantScheme


def test_defaults_round_trip_json():
    s = QuantScheme(bits=3, group_size=64, sym=True, clip_search=True, exclude=["mlp"])
    again = QuantScheme.from_json(s.to_json())
    assert again == s
    assert json.loads(s.to_json())["bits"] == 3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_supported_bits(bits):
    assert QuantScheme(bits=bits).bits == bits


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"bits": 5}, "bits=5 is not supported: use one of 2, 3, 4, 8"),
        ({"bits": True}, "bits=True"),
        ({"group_size": 0}, "group_size=0 is not valid"),
        ({"group_size": -2}, "group_size=-2"),
        ({"group_size": 1.5}, "group_size=1.5"),
        ({"scale_dtype": "int8"}, "scale_dtype='int8' is not supported"),
        ({"clip_max_shrink": 0.0}, "clip_max_shrink"),
        ({"clip_grid": 0}, "clip_grid"),
        ({"include": ["("]}, "not a valid regular expression"),
    ],
)
def test_bad_schemes_give_one_line_errors(kwargs, needle):
    with pytest.raises(LlmsqueezeError) as e:
        QuantScheme(**kwargs)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_field_is_rejected():
    with pytest.raises(LlmsqueezeError, match="unknown scheme fields"):
        QuantScheme.from_dict({"bits": 4, "wbits": 4})


def test_group_size_for():
    assert QuantScheme(group_size=-1).group_size_for(576) == 576
    assert QuantScheme(group_size=128).group_size_for(576) == 128
