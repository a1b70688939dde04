"""The base model's methods a :class:`~vblora.model.VBLoRAModel` passes through, said explicitly:
what transformers' Trainer calls on the model it trains (activation checkpointing, NEFTune's
embedding hook) and what PEFT users call (``get_base_model``); any other attribute is looked up
on the base model, one level only, as PEFT does."""

from __future__ import annotations

from typing import Any

from torch import nn


class BaseModelMethods:
    """Pass-through methods; ``self.model`` is the base model."""

    model: nn.Module

    def __getattr__(self, name: str) -> Any:
        """An attribute this model lacks is looked up on the base model, one level only (PEFT
        does the same: ``model.lm_head``, ``model.layers``). Dunder names are never forwarded."""
        try:
            return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's: parameters, submodules
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("model")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def config(self) -> Any:
        """The base model's config; a model without one has no ``config`` here either (as PEFT)."""
        return self.model.config

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """The base model's activation (gradient) checkpointing, non-reentrant: the only kind
        VB-LoRA supports, since every layer's factors come from one composition per pass, whose
        graph a reentrant checkpoint would run backward through twice. ``kwargs``
        (``every_n_layers``, ``offload``) go to the base model's method as they are."""
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if options["use_reentrant"]:
            raise ValueError(
                "VB-LoRA needs non-reentrant gradient checkpointing: pass {'use_reentrant': False} "
                "(the default here) as the checkpointing kwargs"
            )
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """transformers' older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        (disable or self.model.gradient_checkpointing_disable)()

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()
