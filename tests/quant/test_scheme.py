import pytest

from speedq_core.errors import SchemeError
from speedq_core.quant import QuantScheme


@pytest.mark.parametrize("name", ["w4g128", "w4g32g128", "w2g16g16", "w2g16g16s8", "w3g64", "w8g32g64s2"])
def test_parse_name_round_trip(name):
    assert QuantScheme.parse(name).name == name


def test_bilevel_defaults_to_official_4_bit_scales():
    scheme = QuantScheme(4, 32, scale_group_size=128)
    assert scheme.bilevel and scheme.scale_bits == 4 and scheme.name == "w4g32g128"
    assert QuantScheme.parse("W4G32G128") == scheme
    assert not QuantScheme.parse("w4g128").bilevel


@pytest.mark.parametrize("junk", ["w5g7", "w4", "g128", "w4g0", "w4g128s8", "w4g32g128x", "", "w16g128"])
def test_parse_rejects_junk_with_the_syntax(junk):
    with pytest.raises(SchemeError, match=r"bad scheme .*w\{bits\}g\{group\}"):
        QuantScheme.parse(junk)


def test_bits_5_is_rejected():
    with pytest.raises(SchemeError, match="bits=5"):
        QuantScheme(5, 128)


@pytest.mark.parametrize("kwargs", [dict(group_size=0), dict(group_size=-4), dict(scale_bits=4),
                                    dict(scale_group_size=0), dict(scale_group_size=16, scale_bits=5)])
def test_invalid_construction(kwargs):
    with pytest.raises(SchemeError):
        QuantScheme(bits=4, **{"group_size": 32, **kwargs})


def test_bits_per_weight_against_the_paper():
    """Paper Table 1 caption: w4g128 ~ 4.25 bits vs SPEED-Q w4g32g128 ~ 4.28 bits.

    * 4.25 = 4 + (16 + 16)/128: an fp16 scale and an fp16 zero point per group of 128
      (``zero_bits=16``). Stored as here (4-bit integer zero) w4g128 is 4 + 20/128 = 4.156.
    * w4g32g128 with 4-bit scales, 4-bit integer zeros, fp16 second-level scale and offset:
      4 + (4 + 4)/32 + 2*16/(32*128) = 4.2578. With fp32 second-level parameters (the official
      code keeps them in float) it is 4 + 8/32 + 64/4096 = 4.2656. Neither is 4.28; the nearest
      simple count, 4 + 9/32 = 4.28125, has no matching storage layout, so we do not reproduce the
      paper's 4.28 exactly: our bilevel count is 4.258 (rounds to 4.26).
    """
    assert QuantScheme.parse("w4g128").bits_per_weight(zero_bits=16) == 4.25
    assert QuantScheme.parse("w4g128").bits_per_weight() == 4 + 20 / 128
    bilevel = QuantScheme.parse("w4g32g128")
    assert bilevel.bits_per_weight() == pytest.approx(4.2578125)
    assert bilevel.bits_per_weight(scale_dtype_bits=32) == pytest.approx(4.265625)
    assert QuantScheme.parse("w2g16g16").bits_per_weight() == 2 + 6 / 16 + 32 / 256
