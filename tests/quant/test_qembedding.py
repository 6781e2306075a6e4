"""QuantEmbedding (row lookups from the packed table), second-level padding, export and size of embeddings."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from speedq_core.errors import SchemeError
from speedq_core.export import load_quantized, save_dequantized, save_quantized, write_manifest
from speedq_core.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantScheme,
    gather_codes,
    pack_bits,
    packed_layout,
    quantize_weight,
    swap_embeddings,
    swap_linears,
    tied_linears,
)
from speedq_core.quant.groupwise import minmax_params
from speedq_core.size import packed_weight_nbytes, size_report

SCHEMES = ["w4g32g128", "w2g16g16", "w3g32", "w4g32", "w8g32g16s8"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("row_len", [3, 16, 28])
def test_gather_codes_reads_rows_of_the_bitstream(bits, row_len):
    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37, row_len), dtype=torch.uint8)
    rows = torch.tensor([0, 36, 5, 5, 17])
    assert torch.equal(gather_codes(pack_bits(codes, bits), bits, row_len, rows), codes[rows])


@pytest.mark.parametrize("name", SCHEMES)
def test_lookup_equals_the_dequantized_table_exactly(name):
    torch.manual_seed(0)
    scheme = QuantScheme.parse(name)
    embedding = nn.Embedding(150, 96, padding_idx=3).to(torch.bfloat16)      # 150 rows: G_q misses
    qweight = quantize_weight(embedding.weight.data, scheme)
    quant = QuantEmbedding.from_embedding(embedding, qweight)
    ids = torch.tensor([[0, 3, 149, 7], [7, 128, 127, 64]])
    table = qweight.dequantize(torch.bfloat16)
    out = quant(ids)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 96)
    assert torch.equal(out, F.embedding(ids, table))
    assert torch.equal(quant.lookup(torch.arange(150)), qweight.dequantize())
    assert (out[0, 1] == 0).all()                                               # padding row stays zero
    assert torch.equal(quant.to_embedding(torch.float32).weight, qweight.dequantize())
    quant.float()                                                               # packed buffers keep their dtype
    assert quant(ids).dtype == torch.float32
    assert all(getattr(quant, key).dtype == dtype for key, (_, dtype) in packed_layout(scheme, (150, 96)).items())


def test_from_embedding_checks_shape_and_max_norm():
    scheme = QuantScheme.parse("w4g32")
    with pytest.raises(SchemeError, match="does not fit an embedding"):
        QuantEmbedding.from_embedding(nn.Embedding(10, 64), quantize_weight(torch.randn(10, 32), scheme))
    with pytest.raises(SchemeError, match="max_norm"):
        QuantEmbedding.from_embedding(nn.Embedding(10, 64, max_norm=1.0), quantize_weight(torch.randn(10, 64), scheme))


def reference_bilevel(w: np.ndarray, bits: int, group: int, scale_group: int):
    """Eq. 1 + eq. 2 written out with an explicit *partial* last second-level group (no padding)."""
    out, n_in = w.shape
    scale, zero = minmax_params(torch.from_numpy(w), bits, group)
    scale, zero = scale.numpy(), zero.numpy().astype(np.float32)
    s_hat = np.zeros_like(scale)
    n_second = -(-out // scale_group)
    s2 = np.zeros((n_in // group, n_second), np.float32)
    for col in range(n_in // group):
        for k in range(n_second):
            vals = scale[k * scale_group:(k + 1) * scale_group, col]      # the last slice is short
            lo, hi = vals.min(), vals.max()
            if lo == hi:
                lo, hi = np.float32(-1), np.float32(1)
            step = np.float32(np.float16(max(np.float32((hi - lo) / np.float32(15)), np.float32(1e-5))))
            low = np.float32(np.float16(lo))
            s_hat[k * scale_group:(k + 1) * scale_group, col] = np.clip(np.round((vals - low) / step), 0, 15) * step + low
            s2[col, k] = step
    wg = w.reshape(out, -1, group)
    q = np.clip(np.round(wg / s_hat[..., None]) + zero[..., None], 0, 2**bits - 1)
    return ((q - zero[..., None]) * s_hat[..., None]).reshape(out, n_in), s2


@pytest.mark.parametrize("shape,name", [((300, 64), "w4g32g128"), ((40, 64), "w2g16g16"), ((100, 32), "w4g32g128")])
def test_second_level_padding_is_exact_against_a_partial_group_reference(shape, name):
    torch.manual_seed(3)
    scheme = QuantScheme.parse(name)
    w = torch.randn(shape) * torch.linspace(0.5, 2, shape[0])[:, None]       # scales differ row to row
    qweight = quantize_weight(w, scheme)
    expected, s2 = reference_bilevel(w.numpy(), scheme.bits, scheme.group_size, scheme.scale_group_size)
    np.testing.assert_array_equal(qweight.dequantize().numpy(), expected)
    np.testing.assert_array_equal(qweight.scale2.numpy(), s2)
    second = (shape[1] // scheme.group_size, -(-shape[0] // scheme.scale_group_size))
    assert packed_layout(scheme, shape)["scale2"][0] == second == tuple(qweight.scale2.shape)
    linear = nn.Linear(shape[1], shape[0], bias=False)                         # the padding applies to linears
    quant = QuantLinear.from_linear(linear, qweight)
    x = torch.randn(5, shape[1])
    assert torch.equal(quant(x), F.linear(x, torch.from_numpy(expected)))


class TinyLM(nn.Module):
    def __init__(self, tied: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(300, 64)                                    # 300 rows: G_q = 128 misses
        self.up = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.down = nn.Linear(128, 64, bias=False)
        self.head = nn.Linear(64, 300, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.down(self.norm(self.up(self.embed(ids)))))


SCHEME = QuantScheme.parse("w4g32g128")
IDS = torch.tensor([[1, 5, 299, 30, 256]])


def quantize(model):
    make_linear = lambda n, m: QuantLinear.from_linear(m, quantize_weight(m.weight, SCHEME))  # noqa: E731
    swap_linears(model, ["up", "down", *([] if tied_linears(model, "embed") else ["head"])], make_linear)
    return swap_embeddings(model, ["embed"],
                           lambda n, e: QuantEmbedding.from_embedding(e, quantize_weight(e.weight, SCHEME)))


@pytest.mark.parametrize("tied", [False, True])
def test_export_reload_with_quantized_embeddings_and_head_is_bit_exact(tmp_path, tied):
    model = TinyLM(tied)
    assert quantize(model) == (["embed", "head"] if tied else ["embed"])
    assert isinstance(model.head, QuantLinear) and model.embed.shares_buffers(model.head) == tied
    logits = model(IDS)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert config["embeddings"] == {"embed": {"scheme": "w4g32g128", "shape": [300, 64], "padding_idx": None,
                                              "dtype": "float32"}}
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert ("head.codes" in stored) != tied                                     # a tied head is written once
    if tied:
        assert config["tied"]["head.codes"] == "embed.codes"
    reloaded = load_quantized(TinyLM(tied, seed=1), tmp_path / "q")
    assert isinstance(reloaded.embed, QuantEmbedding) and reloaded.embed.shares_buffers(reloaded.head) == tied
    assert torch.equal(reloaded(IDS), logits)

    save_dequantized(model, tmp_path / "deq", dtype=torch.float32)
    plain_state = load_file(tmp_path / "deq" / "model.safetensors")
    assert torch.equal(plain_state["embed.weight"], model.embed.qweight.dequantize())
    plain = TinyLM(tied, seed=2)
    plain.load_state_dict(plain_state, strict=not tied)
    assert torch.equal(plain(IDS), logits)


def test_old_exports_without_an_embeddings_entry_still_load(tmp_path):
    model = TinyLM(tied=False)
    swap_linears(model, ["up"], lambda n, m: QuantLinear.from_linear(m, quantize_weight(m.weight, SCHEME)))
    save_quantized(model, tmp_path / "q")
    path = tmp_path / "q" / "quant_config.json"
    config = json.loads(path.read_text())
    del config["embeddings"]
    path.write_text(json.dumps(config))
    write_manifest(tmp_path / "q")
    assert torch.equal(load_quantized(TinyLM(False, seed=1), tmp_path / "q")(IDS), model(IDS))


@pytest.mark.parametrize("tied", [False, True])
def test_size_report_counts_packed_embedding_bytes_once(tmp_path, tied):
    model = TinyLM(tied)
    quantize(model)
    save_quantized(model, tmp_path / "q")
    part = {"embed": "embeddings", "head": "lm_head"}
    report = size_report(model, lambda name: part.get(name.split(".")[0], "body"), export_dir=tmp_path / "q")
    sizes = {c.name: c for c in report.components}
    table = packed_weight_nbytes((300, 64), SCHEME)
    assert sizes["embeddings"].n_weights == sizes["embeddings"].n_quantized == 300 * 64
    assert sizes["embeddings"].nbytes == table
    assert ("lm_head" in sizes) != tied
    assert report.nbytes == sum(t.numel() * t.element_size() for t in load_file(tmp_path / "q" / "model.safetensors").values())


def test_tied_head_with_a_bias_is_refused():
    model = TinyLM(tied=True)
    model.head.bias = nn.Parameter(torch.zeros(300))
    with pytest.raises(SchemeError, match="head is tied to an embedding but has a bias"):
        quantize(model)


def test_rtn_quantizes_a_tied_head_once_through_the_embedding(tmp_path):
    from baselines.rtn import RTN
    from speedq_core.method import QuantContext
    from speedq_plugins.families.qwen2_vl import Qwen2VLAdapter

    adapter = Qwen2VLAdapter()
    torch.manual_seed(0)
    model = adapter.build_model(adapter.tiny_config())
    assert tied_linears(model, adapter.embeddings_path) == [adapter.lm_head_path]
    other = QuantScheme.parse("w2g16g16")
    with pytest.raises(SchemeError, match="lm_head is tied to the embeddings"):
        RTN().quantize(model, adapter, QuantContext({"embeddings": SCHEME, "lm_head": other}, tmp_path))
    summary = RTN().quantize(model, adapter, QuantContext({"lm_head": SCHEME}, tmp_path))
    assert summary == {"embeddings": {"scheme": "w4g32g128", "modules": [adapter.embeddings_path, "lm_head"]}}
    embedding = model.get_submodule(adapter.embeddings_path)
    assert isinstance(embedding, QuantEmbedding) and embedding.shares_buffers(model.lm_head)
    sizes = {c.name: c for c in size_report(model, adapter.part_of).components}
    assert "lm_head" not in sizes and sizes["embeddings"].bits_per_weight < 4.3
