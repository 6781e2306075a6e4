"""Find and replace linear layers of a model by dotted name."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from speedq_core.errors import SchemeError, suggest
from speedq_core.quant.fake_quant import FakeQuantLinear
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


def swap_linears(model: nn.Module, names: Iterable[str],
                 make: Callable[[str, nn.Linear], nn.Module]) -> list[str]:
    """Replace each named ``nn.Linear`` by ``make(name, linear)``; all names are checked before any swap.

    Returns the names replaced, in the order given.
    """
    names = list(names)
    linears = find_linears(model)
    missing = [name for name in names if name not in linears]
    if missing:
        raise SchemeError(
            f"no nn.Linear named {missing[0]!r} in the model{suggest(missing[0], linears)}: "
            "pass names from find_linears(model)"
        )
    for name in names:
        _set_submodule(model, name, make(name, linears[name]))
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
