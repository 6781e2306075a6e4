"""Inference token embedding over a packed quantized table, looked up without unpacking the table.

The table ``W`` ``(V, h)`` is quantized exactly like a linear weight with ``out = V`` rows and
``in = h``: groups of ``G`` along the hidden dimension, and for bilevel schemes the second level over
``G_q`` consecutive rows of one group column (padded when ``G_q`` does not divide ``V``, see
:mod:`speedq_core.quant.bilevel`). The module keeps exactly the tensors that go to disk (see
``packed_layout``) as buffers, so its ``state_dict`` is the export.

``forward(ids)`` reads only the looked-up rows ``r``: their codes ``q[r]``, zero points ``z[r]`` and
scale codes ``q_s[r]`` from the bitstreams (:func:`gather_codes`), and the second-level parameters of
their row group ``r // G_q``; then, in float32 and in the same operation order as
``QuantizedWeight.dequantize``::

    s_hat[r] = q_s[r] * s2[:, r // G_q] + m2[:, r // G_q]     (bilevel; fp16 ``scales[r]`` otherwise)
    w_hat[r] = (q[r] - z[r]) * s_hat[r]                        (per group of G)

so a lookup is bit-identical to indexing the dequantized table, while memory holds only the packed
table plus ``O(len(ids) * h)`` temporaries.

Tied output head (Qwen2-VL-2B, FastVLM, Tiny tests): the lm_head weight *is* the embedding table,
with the same ``(V, h)`` layout and the same groups along ``h``. :meth:`QuantEmbedding.tied_linear`
returns a ``QuantLinear`` over the very same buffer storage: the table is quantized once, with the
embedding's scheme, and the exporter writes it once (the head's names are recorded in ``tied``).
The head still dequantizes the whole table at each forward, as every ``QuantLinear`` does. Moving
a model to another *device* copies the two modules' buffers separately (as for any module).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speedq_core.errors import SchemeError
from speedq_core.quant.groupwise import dequantize_groupwise
from speedq_core.quant.qlinear import PackedBuffers, QuantLinear, check_fits
from speedq_core.quant.qweight import QuantizedWeight, check_packed, packed_layout, validate_shape
from speedq_core.quant.scheme import QuantScheme


def gather_codes(stream: torch.Tensor, bits: int, row_len: int, rows: torch.Tensor) -> torch.Tensor:
    """Codes of ``rows`` of a ``(n_rows, row_len)`` matrix packed by ``pack_bits``: uint8 ``(len(rows), row_len)``.

    Code ``i = r * row_len + c`` is stream bits ``[i*b, i*b + b)``: byte ``i*b >> 3`` shifted right by
    ``i*b & 7``, plus the next byte when the code straddles two (3-bit codes).
    """
    index = rows.reshape(-1, 1).long() * row_len + torch.arange(row_len, device=rows.device)
    bit = index * bits
    byte, shift = bit >> 3, bit & 7
    word = stream[byte].long()
    if 8 % bits:
        word |= stream[(byte + 1).clamp_max(stream.numel() - 1)].long() << 8
    return ((word >> shift) & ((1 << bits) - 1)).to(torch.uint8)


def storage_id(tensor: torch.Tensor) -> int:
    """Identity of the storage ``tensor`` views: equal for views and detached copies of one tensor, also on
    the meta device (where every ``data_ptr()`` is 0)."""
    return tensor.untyped_storage()._cdata


class QuantEmbedding(PackedBuffers):
    """Packed ``(num_embeddings, embedding_dim)`` table with ``scheme``; outputs in ``dtype``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme,
                 padding_idx: int | None = None, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        validate_shape(scheme, (num_embeddings, embedding_dim))
        self.num_embeddings, self.embedding_dim, self.scheme = num_embeddings, embedding_dim, scheme
        self.padding_idx, self.dtype = padding_idx, dtype
        self._layout = packed_layout(scheme, (num_embeddings, embedding_dim))
        for name, (shape, buf_dtype) in self._layout.items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], scheme: QuantScheme, shape: tuple[int, int],
                    padding_idx: int | None = None, dtype: torch.dtype = torch.bfloat16) -> QuantEmbedding:
        """A QuantEmbedding over packed ``tensors`` (checked against ``packed_layout``), without copies."""
        check_packed(tensors, scheme, shape)
        module = cls(*shape, scheme, padding_idx=padding_idx, device="meta", dtype=dtype)
        for name in module._layout:
            setattr(module, name, tensors[name].detach())
        return module

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, qweight: QuantizedWeight) -> QuantEmbedding:
        """Replace ``embedding`` by its quantized table ``qweight`` (shape-checked); outputs in its weight dtype."""
        check_fits(qweight, embedding.weight, "embedding")
        if embedding.max_norm is not None:
            raise SchemeError("an nn.Embedding with max_norm rescales its rows at lookup: it cannot be "
                              "quantized; keep it in float")
        return cls.from_packed(qweight.to_packed_tensors(), qweight.scheme, qweight.shape,
                               embedding.padding_idx, embedding.weight.dtype)

    @property
    def qweight(self) -> QuantizedWeight:
        """The QuantizedWeight these buffers encode."""
        tensors = {name: getattr(self, name) for name in self._layout}
        return QuantizedWeight.from_packed_tensors(tensors, self.scheme, self.shape)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """``w_hat[rows]``, float32 ``(len(rows), embedding_dim)``, from the looked-up rows' packed data only."""
        scheme, rows = self.scheme, rows.reshape(-1)
        n_groups = self.embedding_dim // scheme.group_size
        codes = gather_codes(self.codes, scheme.bits, self.embedding_dim, rows)
        zero = gather_codes(self.zeros, scheme.bits, n_groups, rows)
        if scheme.bilevel:
            scale_q = gather_codes(self.scale_codes, scheme.scale_bits, n_groups, rows).float()
            second = rows // scheme.scale_group_size
            scale = scale_q * self.scale2.float()[:, second].t() + self.min2.float()[:, second].t()
        else:
            scale = F.embedding(rows, self.scales).float()
        return dequantize_groupwise(codes, scale, zero, scheme.group_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids).to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    @torch.no_grad()
    def to_embedding(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        """A plain nn.Embedding holding ``w_hat`` in ``dtype`` (default: the output dtype)."""
        embedding = nn.Embedding(*self.shape, padding_idx=self.padding_idx, device="meta", dtype=dtype or self.dtype)
        embedding.weight = nn.Parameter(self.qweight.dequantize(dtype or self.dtype))
        return embedding

    def tied_linear(self) -> QuantLinear:
        """The output head tied to this table: a bias-free QuantLinear ``(V, h)`` sharing these buffers."""
        tensors = {name: getattr(self, name) for name in self._layout}
        return QuantLinear.from_packed(tensors, self.scheme, self.shape)

    def shares_buffers(self, module: nn.Module) -> bool:
        """Whether ``module`` (e.g. a tied QuantLinear) reads this table's packed codes."""
        codes = getattr(module, "codes", None)
        return isinstance(codes, torch.Tensor) and storage_id(codes) == storage_id(self.codes)

    def _apply(self, fn, recurse=True):
        """Packed buffers keep their dtype; the output dtype follows float casts."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}, " \
               f"padding_idx={self.padding_idx}, dtype={self.dtype}"
