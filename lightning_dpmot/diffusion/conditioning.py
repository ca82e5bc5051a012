"""Conditioning as one mapping, passed through unchanged (k-diffusion's ``extra_args``).

Every denoiser, sampler, loss and network of the project takes ``cond: Cond | None``, a ``dict[str, Tensor]`` whose
tensors all have the batch as their first dimension, for example

- class labels: ``{"label": (B,) int64}`` (-1 = no class);
- text: ``{"tokens": (B, L, C) float, "mask": (B, L) bool, "pooled": (B, C) float}``.

``None`` (or ``{}``) is the unconditional model. Nothing between the DataModule and the network looks inside the
mapping: only the :class:`Conditioner` of a model (which keys it reads from a batch, what its null condition is,
how conditions are dropped for classifier-free guidance, what the network must be built with) and the network
itself know what the keys mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

Cond = dict[str, Tensor]
"""A condition mapping: every value has the batch as its first dimension."""


def cond_batch_size(cond: Mapping[str, Tensor]) -> int:
    """The common first dimension B of the mapping's tensors (ValueError if they disagree or it is empty)."""
    sizes = {k: int(v.shape[0]) for k, v in cond.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"a condition mapping needs tensors with one common batch dimension, got {sizes}")
    return next(iter(sizes.values()))


def cond_cat(*conds: Cond | None) -> Cond | None:
    """Concatenate mappings with the same keys along the batch (``None`` stays ``None``)."""
    if all(c is None or not c for c in conds):
        return None
    keys = [tuple(sorted(c)) if c else () for c in conds]
    if len(set(keys)) != 1:
        raise ValueError(f"cannot concatenate condition mappings with different keys: {keys}")
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}  # type: ignore[index]


def cond_to(cond: Cond | None, device: torch.device | str) -> Cond | None:
    """The mapping with every tensor on ``device``."""
    return None if cond is None else {k: v.to(device) for k, v in cond.items()}


def cond_select(cond: Cond | None, index: Tensor | slice) -> Cond | None:
    """Rows ``index`` of every tensor of the mapping."""
    return None if cond is None else {k: v[index] for k, v in cond.items()}


def cond_where(mask: Tensor, a: Cond, b: Cond) -> Cond:
    """Per sample: ``a`` where ``mask`` (B,) is True, else ``b`` (same keys and shapes)."""
    out = {}
    for key, value in a.items():
        m = mask.reshape(mask.shape[0], *([1] * (value.ndim - 1)))
        out[key] = torch.where(m, value, b[key])
    return out


class Conditioner(nn.Module):
    """What a model is conditioned on; owns the null condition and the classifier-free-guidance dropout.

    The base class is the unconditional model: it reads nothing from a batch and its networks are built without
    conditioning inputs. Subclasses set ``keys`` and implement :meth:`null` (and may override :meth:`net_kwargs`).

    Args:
        dropout: probability of replacing a training sample's condition by the null condition (CFG training).
    """

    keys: tuple[str, ...] = ()

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"condition dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout

    @property
    def conditional(self) -> bool:
        return bool(self.keys)

    def net_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the network factory needs for this conditioning (``net(data_shape, **net_kwargs)``)."""
        return {}

    def from_batch(self, batch: Mapping[str, Any]) -> Cond | None:
        """The condition mapping of a batch (or of a generation request): the entries named by ``keys``."""
        if not self.conditional:
            return None
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__} needs the batch entries {list(self.keys)}; missing {missing}")
        return {k: batch[k] for k in self.keys}

    def prepare(self, raw: Mapping[str, Any] | None) -> Cond | None:
        """The condition mapping of a generation request (None if it holds nothing this conditioner uses).

        Requests may leave out a condition (the network then sees its null, e.g. label None = all -1), carry
        entries the model does not use, or carry raw conditions (prompts) that the conditioner encodes."""
        if not self.conditional or not raw:
            return None
        picked = {k: raw[k] for k in self.keys if k in raw}
        return picked or None

    def null(self, cond: Cond) -> Cond:
        """The null ("no condition") mapping with the same keys and batch size as ``cond``."""
        raise NotImplementedError(f"{type(self).__name__} has no null condition")

    def drop(self, cond: Cond | None, generator: torch.Generator) -> Cond | None:
        """Replace each sample's condition by the null one with probability ``dropout`` (one uniform per sample)."""
        if cond is None or self.dropout == 0.0:
            return cond
        first = cond[self.keys[0]]
        drop = torch.rand((cond_batch_size(cond),), generator=generator, device=first.device) < self.dropout
        return cond_where(drop, self.null(cond), cond)


class ClassConditioner(Conditioner):
    """Class labels ``{"label": (B,) int64}``; the null label is -1 (EDM's all-zero one-hot).

    Args:
        num_classes: K >= 1; networks are built with ``num_classes=K``.
        dropout: CFG label dropout probability.
    """

    keys = ("label",)

    def __init__(self, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        if num_classes < 1:
            raise ValueError("class conditioning needs a dataset with classes (num_classes >= 1)")
        self.num_classes = num_classes

    def net_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def null(self, cond: Cond) -> Cond:
        return {"label": torch.full_like(cond["label"], -1)}


__all__ = [
    "ClassConditioner",
    "Cond",
    "Conditioner",
    "cond_batch_size",
    "cond_cat",
    "cond_select",
    "cond_to",
    "cond_where",
]
