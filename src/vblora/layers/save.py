"""``modules_to_save``: a module trained in full (e.g. a classifier head), one copy per adapter."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from ..core.routing import RowRouting, current_routing


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full (e.g. a classifier head): one trainable copy per adapter.

    Keeps PEFT's attribute names (``original_module``, ``modules_to_save.<adapter>``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        trainable.requires_grad_(True)
        self.modules_to_save[name] = trainable

    def remove_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, names: tuple[str, ...]) -> None:
        chosen = [n for n in names if n in self.modules_to_save]
        self.active_adapter = chosen[0] if chosen else None

    # PEFT's names for the same state
    adapter_layer_names = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()

    @property
    def active_adapters(self) -> list[str]:
        return [] if self.active_adapter is None else [self.active_adapter]

    def in_use(self) -> nn.Module:
        """The module a plain call runs: the active adapter's copy, else the original."""
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    @property
    def weight(self) -> Tensor:  # code such as get_output_embeddings().weight reads the head's
        return self.in_use().weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return self.in_use().bias  # type: ignore[return-value]

    def forward(self, *args: object, **kwargs: object) -> object:
        routing = current_routing()
        if routing is not None and not self.disabled:
            if len(args) != 1 or any(v is not None for v in kwargs.values()):
                raise ValueError(
                    f"a mixed-adapter batch routes a modules_to_save module by rows of its one input; "
                    f"this {type(self.original_module).__name__} is called with more (e.g. an attention "
                    "mask), which cannot be split safely. Save a head (classifier, lm_head) instead, "
                    "or run each adapter's rows as its own batch"
                )
            return self._forward_mixed(args[0], routing)  # type: ignore[arg-type]
        return self.in_use()(*args, **kwargs)

    def _forward_mixed(self, x: Tensor, routing: RowRouting) -> Tensor:
        """Rows of adapters with a trained copy use it; the other rows use the original module."""
        result = self.original_module(x)
        for name in routing.rows:  # the batch's adapters, not every adapter loaded
            if name in self.modules_to_save:
                module = self.modules_to_save[name]
                rows = routing.rows_for(name, x.shape[0], f"the saved {type(module).__name__}")
                result = result.index_copy(0, rows, module(x.index_select(0, rows)).to(result.dtype))
        return result
