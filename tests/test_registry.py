"""registry.toml parsing: presets, schemes, suites and the errors for malformed entries."""
import pytest

from speedq_core.errors import RegistryError, UnknownNameError
from speedq_core.plugins import get_plugins
from speedq_core.registry import load_registry

PRESETS = ["internvl3-1b", "internvl3-2b", "internvl2.5-1b", "qwen2-vl-2b", "fastvlm-0.5b",
           "llava-1.5-7b", "llava-1.5-13b", "tiny-internvl", "tiny-qwen2-vl", "tiny-fastvlm", "tiny-llava"]


def test_every_required_preset_exists_and_names_an_installed_family():
    registry, families = load_registry(), get_plugins().families
    for name in PRESETS:
        preset = registry.model(name)
        assert preset.family in families, name
        assert preset.tiny or preset.hf_id


def test_scheme_presets_match_their_names():
    registry = load_registry()
    for name in ("w4g128", "w4g32g128", "w2g16", "w2g16g16"):
        assert registry.scheme(name).name == name
    assert registry.scheme("w2g16g16").scale_group_size == 16
    assert registry.scheme("w4g64").group_size == 64  # spelled-out schemes work too


def test_paper_suite_has_the_eight_benchmarks():
    assert len(load_registry().suite("paper").benchmarks) == 8


@pytest.mark.parametrize(
    "body, match",
    [
        ('[models.x]\nhf_id = "a/b"\n[models.x.architecture]\nk = 1\n', "needs family"),
        ('[models.x]\nfamily = "internvl"\nhf_id = "a/b"\n', "architecture"),
        ('[models.x]\nfamily = "internvl"\ntiny = true\ncolour = 1\n', "unknown keys"),
        ('[schemes.w4g128]\nbits = 5\ngroup_size = 128\n', "malformed"),
        ('[schemes.w4g64]\nbits = 4\ngroup_size = 128\n', "rename it to w4g128"),
        ('[suites.s]\nbenchmarks = []\n', "needs benchmarks"),
        ("[models.x\n", "not valid TOML"),
    ],
)
def test_malformed_entries_name_the_entry(tmp_path, body, match):
    path = tmp_path / "registry.toml"
    path.write_text(body)
    with pytest.raises(RegistryError, match=match):
        load_registry(path)


def test_unknown_model_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'internvl3-1b'"):
        load_registry().model("internvl3-1")
