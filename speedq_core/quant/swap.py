"""Find and replace linear and embedding layers of a model by dotted name."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from speedq_core.errors import SchemeError, suggest
from speedq_core.quant.fake_quant import FakeQuantLinear
from speedq_core.quant.qembedding import QuantEmbedding
from speedq_core.quant.qlinear import QuantLinear


def find_linears(model: nn.Module, prefix: str | None = None) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by dotted name, optionally only those at or under ``prefix``."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (prefix is None or name == prefix or name.startswith(prefix + "."))
    }


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _require(names: list[str], found: dict, kind: str, finder: str) -> None:
    """SchemeError naming the first of ``names`` that is not in ``found`` (checked before any swap)."""
    missing = [name for name in names if name not in found]
    if missing:
        raise SchemeError(
            f"no {kind} named {missing[0]!r} in the model{suggest(missing[0], found)}: "
            f"pass names from {finder}(model)"
        )


def swap_linears(model: nn.Module, names: Iterable[str],
                 make: Callable[[str, nn.Linear], nn.Module]) -> list[str]:
    """Replace each named ``nn.Linear`` by ``make(name, linear)``; all names are checked before any swap.

    Returns the names replaced, in the order given.
    """
    names = list(names)
    linears = find_linears(model)
    _require(names, linears, "nn.Linear", "find_linears")
    for name in names:
        try:
            replacement = make(name, linears[name])
        except SchemeError as exc:  # name the layer: a shape error means nothing without it
            raise SchemeError(f"{name}: {exc}") from None
        _set_submodule(model, name, replacement)
    return names


def to_plain_linears(model: nn.Module, dtype=None) -> list[str]:
    """Turn every QuantLinear / FakeQuantLinear back into an ``nn.Linear`` holding ``w_hat`` (in ``dtype``).

    Returns the names replaced.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, (QuantLinear, FakeQuantLinear))]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).to_linear(dtype))
    return names


def to_quant_linears(model: nn.Module) -> list[str]:
    """Freeze every FakeQuantLinear into a QuantLinear of its current quantized weight (exact, for export).

    Returns the names replaced.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)]
    for name in names:
        fake = model.get_submodule(name)
        _set_submodule(model, name, QuantLinear.from_qweight(fake.to_quantized_weight(), fake.bias))
    return names


def find_embeddings(model: nn.Module) -> dict[str, nn.Embedding]:
    """Every ``nn.Embedding`` of ``model`` by dotted name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Embedding)}


def tied_linears(model: nn.Module, embedding_name: str) -> list[str]:
    """Names of the ``nn.Linear`` layers whose weight *is* the weight of embedding ``embedding_name`` (tied heads);
    none once the embedding is a QuantEmbedding (its tied head is then a QuantLinear, see ``swap_embeddings``)."""
    embedding = model.get_submodule(embedding_name)
    if not isinstance(embedding, nn.Embedding):
        return []
    return [name for name, linear in find_linears(model).items() if linear.weight is embedding.weight]


def swap_embeddings(model: nn.Module, names: Iterable[str],
                    make: Callable[[str, nn.Embedding], QuantEmbedding]) -> list[str]:
    """Replace each named ``nn.Embedding`` by ``make(name, embedding)``, and every linear tied to it by
    the QuantEmbedding's :meth:`~QuantEmbedding.tied_linear` (same buffers: quantized once, stored once).

    All names are checked before any swap. Returns the names replaced, tied heads after their table.
    A tied head must be bias-free (it is ``x @ W^T`` with the table ``W``).
    """
    names = list(names)
    embeddings = find_embeddings(model)
    _require(names, embeddings, "nn.Embedding", "find_embeddings")
    heads = {name: tied_linears(model, name) for name in names}
    biased = [head for tied in heads.values() for head in tied if model.get_submodule(head).bias is not None]
    if biased:
        raise SchemeError(f"{biased[0]} is tied to an embedding but has a bias: untie it before quantizing")
    replaced = []
    for name in names:
        quant = make(name, embeddings[name])
        _set_submodule(model, name, quant)
        for head in heads[name]:
            _set_submodule(model, head, quant.tied_linear())
        replaced += [name, *heads[name]]
    return replaced


def to_plain_embeddings(model: nn.Module, dtype=None) -> list[str]:
    """Turn every QuantEmbedding back into an ``nn.Embedding`` holding ``w_hat`` (in ``dtype``), and every
    QuantLinear that shares its buffers into an ``nn.Linear`` tied to that new embedding's weight.

    Returns the names replaced.
    """
    replaced = []
    modules = dict(model.named_modules())
    for name, quant in modules.items():
        if not isinstance(quant, QuantEmbedding):
            continue
        plain = quant.to_embedding(dtype)
        _set_submodule(model, name, plain)
        replaced.append(name)
        for head, module in modules.items():
            if isinstance(module, QuantLinear) and quant.shares_buffers(module):
                linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
                linear.weight = plain.weight
                _set_submodule(model, head, linear)
                replaced.append(head)
    return replaced
