"""Quantization math: schemes, group-wise and bilevel quantizers, packing, fake-quant and packed modules
(linears and embeddings)."""
from speedq_core.quant.bilevel import dequantize_scales, quantize_scales
from speedq_core.quant.clipping import clip_error, search_clip
from speedq_core.quant.fake_quant import FakeQuantLinear
from speedq_core.quant.groupwise import dequantize_groupwise, quantize_groupwise, quantize_with_params
from speedq_core.quant.pack import pack_bits, packed_nbytes, unpack_bits
from speedq_core.quant.qembedding import QuantEmbedding, gather_codes
from speedq_core.quant.qlinear import QuantLinear
from speedq_core.quant.qweight import QuantizedWeight, packed_layout, quantize_weight, relative_error
from speedq_core.quant.scheme import QuantScheme
from speedq_core.quant.swap import (
    find_embeddings,
    find_linears,
    swap_embeddings,
    swap_linears,
    tied_linears,
    to_plain_embeddings,
    to_plain_linears,
    to_quant_linears,
)

__all__ = [
    "FakeQuantLinear",
    "QuantEmbedding",
    "QuantLinear",
    "QuantScheme",
    "QuantizedWeight",
    "clip_error",
    "dequantize_groupwise",
    "dequantize_scales",
    "find_embeddings",
    "find_linears",
    "gather_codes",
    "pack_bits",
    "packed_layout",
    "packed_nbytes",
    "quantize_groupwise",
    "quantize_scales",
    "quantize_weight",
    "quantize_with_params",
    "relative_error",
    "search_clip",
    "swap_embeddings",
    "swap_linears",
    "tied_linears",
    "to_plain_embeddings",
    "to_plain_linears",
    "to_quant_linears",
    "unpack_bits",
]
