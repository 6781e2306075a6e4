import json

import pytest
import torch
from torch import nn

from speedq_core.export import save_quantized
from speedq_core.quant import QuantLinear, QuantScheme, quantize_weight, swap_linears
from speedq_core.size import MIB, estimate_bytes, packed_weight_nbytes, size_report


class VLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128))
        self.projector = nn.Linear(128, 64)
        self.embed = nn.Embedding(100, 64)
        self.language = nn.ModuleList([nn.Linear(64, 128, bias=False), nn.Linear(128, 64, bias=False)])
        self.lm_head = nn.Linear(64, 100, bias=False)
        self.lm_head.weight = self.embed.weight


def component_of(name: str) -> str:
    head = name.split(".")[0]
    return {"embed": "embeddings"}.get(head, head)


@pytest.mark.parametrize("name", ["w4g32g128", "w2g16g16", "w4g128", "w3g32"])
def test_packed_bytes_match_the_packer_and_bits_per_weight(name):
    scheme = QuantScheme.parse(name)
    shape = (128, 256)
    packed = quantize_weight(torch.randn(shape), scheme).to_packed_tensors()
    nbytes = sum(t.numel() * t.element_size() for t in packed.values())
    assert packed_weight_nbytes(shape, scheme) == nbytes
    assert 8 * nbytes / (128 * 256) == scheme.bits_per_weight()
    other = packed_weight_nbytes((256, 128), scheme)
    assert estimate_bytes({shape: 3, (256, 128): 2}, scheme) == 3 * nbytes + 2 * other
    assert estimate_bytes({shape: 3}, None) == 3 * 128 * 256 * 2


def test_report_of_a_float_model_counts_tied_weights_once():
    report = size_report(VLM(), component_of)
    sizes = {c.name: c for c in report.components}
    assert set(sizes) == {"vision", "projector", "embeddings", "language"}
    assert sizes["embeddings"].n_weights == 6400 and sizes["embeddings"].bits_per_weight == 32
    assert report.n_weights == sum(p.numel() for p in VLM().parameters())
    assert report.nbytes == 4 * report.n_weights and report.export_bytes is None


def test_report_of_a_quantized_model_and_its_export(tmp_path):
    model = VLM()
    scheme = QuantScheme.parse("w4g32g64")
    swap_linears(model, ["language.0", "language.1"],
                 lambda n, m: QuantLinear.from_linear(m, quantize_weight(m.weight, scheme)))
    save_quantized(model, tmp_path / "q")
    report = size_report(model, component_of, export_dir=tmp_path / "q")
    language = {c.name: c for c in report.components}["language"]
    assert language.n_weights == language.n_quantized == 2 * 64 * 128
    assert language.bits_per_weight == pytest.approx(scheme.bits_per_weight())
    files = sum(p.stat().st_size for p in (tmp_path / "q").iterdir())
    assert report.export_bytes == files and report.nbytes < files < report.nbytes + 20_000
    data = json.loads(json.dumps(report.to_json()))
    assert data["nbytes"] == report.nbytes and {r["name"] for r in data["components"]} >= {"language", "vision"}
    table = report.to_markdown()
    assert "| language | 16,384 | 16,384 |" in table and "on disk:" in table


def test_state_dict_and_meta_models_are_sized_without_data():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096, bias=False), nn.Linear(4096, 1024, bias=False))
    report = size_report(model.state_dict(), lambda name: "language")
    assert report.nbytes == (4096 * 4096 + 4096 * 1024) * 4
    shapes = {tuple(m.weight.shape): 1 for m in model}
    assert estimate_bytes(shapes, QuantScheme.parse("w2g16g16")) / MIB == pytest.approx(
        report.n_weights * 2.5 / 8 / MIB)
