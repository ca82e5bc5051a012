"""UPainting-style text-to-image diffusion (part 1): a frozen pretrained Transformer LM conditions an EDM model
through cross-attention and a pooled vector; classifier-free guidance at sampling.

:class:`TextToImageModule` is :class:`~lightning_dpmot.models.edm.EDMModule` with a
:class:`~lightning_dpmot.diffusion.text_conditioning.TextConditioner`: training batches carry prompts
(``batch[text_key]``, a list of B strings), the frozen encoder turns them into ``{"tokens", "mask", "pooled"}``,
10 % of them are dropped to the null condition (an empty mask, which the network replaces by its learned null),
and everything downstream — EDM preconditioning and loss, samplers, EMA, the OT coupling callback, CFG — is the
house's generic code. The network must take ``context_dim`` (e.g. ``DDPMppUNet`` with ``cross_attn_resolutions``).

The encoder is frozen: no gradients, always in eval mode, its weights are not parameters of this module (so not in
the optimizer, not in checkpoints, shared rather than copied by EMA's deep copy).
"""

from __future__ import annotations

from typing import Any

from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.diffusion.text_conditioning import TextConditioner
from lightning_dpmot.models.base import NetFactory
from lightning_dpmot.models.edm import EDMModule
from lightning_dpmot.nets.text_encoder import TextEncoder


class TextToImageModule(EDMModule):
    """EDM conditioned on prompts by a frozen LM.

    Args:
        net: the raw network, built as ``net(data_shape, context_dim=encoder.dim)``.
        text_encoder: the frozen LM (default: the embedded all-MiniLM-L6-v2; YAML: a ``TextEncoder`` class_path
            with ``init_args``, e.g. ``pretrained: /path/to/t5-v1_1-base`` on a cluster).
        text_key: batch entry with the prompts the LM reads (``caption_en``: the English line of bilingual pairs).
        cond_dropout: probability of the null condition during training (for classifier-free guidance).
        guidance: default guidance for sample grids and ``predict`` (e.g. ``{scale: 3.0}``).
        **kwargs: :class:`EDMModule` / :class:`~lightning_dpmot.models.base.DiffusionModule` arguments.
    """

    def __init__(
        self,
        net: NetFactory,
        text_encoder: TextEncoder | None = None,
        text_key: str = "caption_en",
        cond_dropout: float = 0.1,
        guidance: GuidanceSpec | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("class_conditional"):
            raise ValueError("TextToImageModule is conditioned on text; class_conditional must stay false")
        encoder = text_encoder if text_encoder is not None else TextEncoder()
        conditioner = TextConditioner(encoder, text_key=text_key, dropout=cond_dropout)
        super().__init__(net, guidance=guidance, conditioner=conditioner, **kwargs)

    @property
    def text_encoder(self) -> TextEncoder:
        return self.conditioner.encoder  # type: ignore[return-value]


__all__ = ["TextToImageModule"]
