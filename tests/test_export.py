import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from speedq_core import export
from speedq_core.errors import CheckpointError
from speedq_core.export import load_quantized, save_dequantized, save_quantized, write_manifest
from speedq_core.quant import FakeQuantLinear, QuantLinear, QuantScheme, find_linears, quantize_weight, swap_linears

SCHEMES = {"up": QuantScheme.parse("w4g32g128"), "down": QuantScheme.parse("w2g16g16")}


class Tiny(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(32, 64)
        self.up = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.down = nn.Linear(128, 64, bias=False)
        self.head = nn.Linear(64, 32, bias=False)
        self.head.weight = self.embed.weight           # tied, stays unquantized
        self.register_buffer("position", torch.arange(4, dtype=torch.float32))

    def forward(self, ids):
        h = self.embed(ids) + self.position[: ids.shape[-1], None]
        return self.head(self.down(self.norm(self.up(h))))


def quantize(model, schemes):
    swap_linears(model, schemes, lambda n, m: QuantLinear.from_linear(m, quantize_weight(m.weight, schemes[n])))
    return model


@pytest.fixture
def exported(tmp_path):
    model = quantize(Tiny(), SCHEMES)
    save_quantized(model, tmp_path / "q", {"method": "rtn"})
    return model, tmp_path / "q"


IDS = torch.tensor([[1, 5, 7, 30]])


def test_reload_is_bit_exact(exported):
    model, out = exported
    config = json.loads((out / "quant_config.json").read_text())
    assert config["modules"] == {"up": {"scheme": "w4g32g128", "shape": [128, 64], "bias": True},
                                 "down": {"scheme": "w2g16g16", "shape": [64, 128], "bias": False}}
    assert config["method"] == "rtn" and config["tied"] == {"head.weight": "embed.weight"}
    assert "up.codes" in load_file(out / "model.safetensors")
    loaded = load_quantized(Tiny(seed=1), out)
    assert isinstance(loaded.up, QuantLinear) and loaded.head.weight is loaded.embed.weight
    assert torch.equal(loaded(IDS), model(IDS))


def test_reload_into_another_dtype_skeleton_keeps_saved_dtypes(exported):
    model, out = exported
    loaded = load_quantized(Tiny(seed=1).to(torch.bfloat16), out)
    assert loaded.norm.weight.dtype == torch.float32
    assert torch.equal(loaded(IDS), model(IDS))


def test_flipped_byte_is_detected(exported):
    _, out = exported
    path = out / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors fails its sha256 check"):
        load_quantized(Tiny(), out)


def test_truncated_file_is_detected(exported):
    _, out = exported
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_quantized(Tiny(), out)


def test_missing_manifest(exported):
    _, out = exported
    (out / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_quantized(Tiny(), out)


def edit_config(out, change):
    path = out / "quant_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    write_manifest(out)   # a consistent but wrong export: only the content checks can catch it


@pytest.mark.parametrize("change,message", [
    (lambda c: c["modules"]["up"].update(scheme="w5g32"), "module 'up' has an unknown scheme"),
    (lambda c: c["modules"]["up"].update(scheme="w4g16g128"), r"module 'up': packed tensor 'zeros' is \(128,\)"),
    (lambda c: c["modules"]["up"].update(shape=[128, 32]), "skeleton's linear is"),
    (lambda c: c["modules"].update(norm=c["modules"]["up"]), "'norm' is not an nn.Linear"),
    (lambda c: c.update(version=2), "version 2"),
    (lambda c: c.update(tied={}), "'head.weight' is missing"),
])
def test_config_mismatch(exported, change, message):
    _, out = exported
    edit_config(out, change)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(Tiny(), out)


def test_tensor_mismatch(exported):
    _, out = exported
    tensors = load_file(out / "model.safetensors")
    del tensors["down.scale2"]
    tensors["norm.weight"] = torch.ones(3)
    save_file(tensors, out / "model.safetensors")
    write_manifest(out)
    with pytest.raises(CheckpointError, match="'down.scale2' is missing"):
        load_quantized(Tiny(), out)
    tensors = load_file(out / "model.safetensors")
    tensors["down.scale2"] = torch.ones(8, 4, dtype=torch.float16)
    save_file(tensors, out / "model.safetensors")
    write_manifest(out)
    with pytest.raises(CheckpointError, match="'norm.weight' has shape"):
        load_quantized(Tiny(), out)


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch, exported):
    model, out = exported
    before = (out / "model.safetensors").read_bytes()

    def fail(state, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "fresh")
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, out)                         # overwrite attempt keeps the old export
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert (out / "model.safetensors").read_bytes() == before


def test_fake_quant_modules_must_be_frozen_first(tmp_path):
    model = Tiny()
    swap_linears(model, ["up"], lambda n, m: FakeQuantLinear.from_linear(m, SCHEMES["up"]))
    with pytest.raises(CheckpointError, match="to_quant_linears"):
        save_quantized(model, tmp_path / "q")


def test_save_dequantized_plain_module(tmp_path, exported):
    model, _ = exported
    save_dequantized(model, tmp_path / "deq", dtype=torch.float32)
    tensors = load_file(tmp_path / "deq" / "model.safetensors")
    assert torch.equal(tensors["up.weight"], model.up.qweight.dequantize())
    plain = Tiny(seed=3)
    plain.load_state_dict({**tensors, "head.weight": tensors["embed.weight"]})
    assert torch.equal(plain(IDS), model(IDS))
    assert isinstance(model.up, QuantLinear)               # the original model is untouched


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.slow  # about 3 s, mostly importing transformers' model code
def test_tiny_qwen2_export_reload_and_dequantized_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_qwen2()
    names = [n for n in find_linears(model, prefix="model.layers")]
    schemes = {n: QuantScheme.parse("w2g16g16" if "mlp" in n else "w4g16g16") for n in names}
    quantize(model, schemes)
    ids = torch.tensor([[3, 17, 99, 5, 64, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    save_quantized(model, tmp_path / "q", {"model": "tiny-qwen2"})
    reloaded = load_quantized(tiny_qwen2(), tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)

    save_dequantized(model, tmp_path / "deq")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "deq")
    assert plain.dtype == torch.bfloat16
    assert type(plain.model.layers[0].mlp.down_proj) is nn.Linear
    assert torch.equal(plain.model.layers[0].mlp.down_proj.weight,
                       model.model.layers[0].mlp.down_proj.qweight.dequantize(torch.bfloat16))
    with torch.no_grad():
        plain_logits = plain(ids).logits.float()
    assert torch.allclose(plain_logits, logits, atol=0.05, rtol=0.05)
