"""Time-dependent discriminator d_phi(x_sigma, sigma) of Discriminator Guidance (Kim et al., ICML 2023).

The network returns the logit ``l(x, sigma) = log(d / (1 - d))``, the quantity whose input gradient is DG's score
correction (:mod:`~lightning_dpmot.diffusion.discriminator_guidance`). Structure (DG's ``classifier_lib.py``: a
frozen pretrained encoder, a small trainable head):

    z = features(s(sigma) * x)                    feature trunk (frozen by default), (B, F)
    e = PositionalEmbedding(ln(sigma) / 4)        EDM's c_noise, (B, E)
    l = MLP([z, e])                               trainable head, (B,)

with the input scale ``s(sigma) = 1 / sqrt(1 + sigma^2 / sigma_data^2)`` (= sigma_data * c_in of EDM), which keeps
clean data at its own [-1, 1] scale (s(0) = 1, the trunk's training input) and bounds noisy inputs.

Feature trunks (:func:`feature_trunk`): ``classifier`` — the convolutional trunk and feature layer of the small-data
classifier (:class:`~lightning_dpmot.metrics.classifier.ClassifierFeatures`, the digits' FID feature space; its weights
are copied in by :meth:`TimeDiscriminator.load_features`); ``inception`` — Inception-v3 pool features (2048-d) for
RGB data on a GPU; ``none`` — flattened pixels (toy data and tests).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_dpmot.metrics.classifier import DEFAULT_HPARAMS, ClassifierFeatures, image_trunk
from lightning_dpmot.nets.embeddings import PositionalEmbedding

FeatureName = Literal["classifier", "inception", "none"]


class ClassifierTrunk(nn.Module):
    """The classifier's trunk + feature layer on network-scale input: (B, C, H, W) ~[-1, 1] -> (B, num_features).

    Unlike :meth:`ClassifierFeatures.forward` there is no clamping (gradients must reach noisy inputs).
    """

    def __init__(self, data_shape: tuple[int, ...], num_features: int, width: int) -> None:
        super().__init__()
        self.trunk, trunk_dim = image_trunk(data_shape[0], data_shape[1], width)
        self.feature_layer = nn.Sequential(nn.Linear(trunk_dim, num_features), nn.SiLU())
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.feature_layer(self.trunk(x))

    def copy_from(self, classifier: ClassifierFeatures) -> None:
        """Take the trained weights of ``classifier`` (same architecture)."""
        self.trunk.load_state_dict(classifier.trunk.state_dict())
        self.feature_layer.load_state_dict(classifier.feature_layer.state_dict())


class InceptionTrunk(nn.Module):
    """Inception-v3 pool features of ``(x + 1) / 2``: (B, 1 or 3, H, W) in ~[-1, 1] -> (B, 2048).

    The FID network's pixel conversion clamps and rounds to 8 bits; here it is replaced by the plain affine map
    ``255 (x + 1) / 2`` so that gradients reach the input.
    """

    def __init__(self, weights: str | None = None, pretrained: bool = True) -> None:
        super().__init__()
        from lightning_dpmot.metrics.inception import InceptionV3Features

        class _Smooth(InceptionV3Features):
            def _to_pixels(self, x: Tensor) -> Tensor:
                v = x.to(self.fc.weight.dtype) * 255.0
                return v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v

        self.net = _Smooth(weights, quantize=False, pretrained=pretrained)
        self.num_features = 2048

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x + 1) / 2).float()


class PixelTrunk(nn.Module):
    """Flattened input (no learned features): (B, *S) -> (B, prod(S))."""

    def __init__(self, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.num_features = int(torch.tensor(data_shape).prod())

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def feature_trunk(
    name: FeatureName, data_shape: tuple[int, ...], inception_weights: str | None = None
) -> ClassifierTrunk | InceptionTrunk | PixelTrunk:
    """The frozen feature trunk ``name`` for data of shape ``data_shape`` (module docstring)."""
    if name == "classifier":
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise ValueError(f"classifier features need square images (C, H, H), got {tuple(data_shape)}")
        return ClassifierTrunk(data_shape, DEFAULT_HPARAMS["num_features"], DEFAULT_HPARAMS["width"])
    if name == "inception":
        return InceptionTrunk(inception_weights)
    if name == "none":
        return PixelTrunk(data_shape)
    raise ValueError(f"feature must be 'classifier', 'inception' or 'none', got {name!r}")


class TimeDiscriminator(nn.Module):
    """Logit l(x, sigma) = log(d / (1 - d)) of a noised-real vs noised-generated discriminator.

    Args:
        data_shape: shape of one sample S.
        feature: frozen trunk (``classifier``, ``inception``, ``none``).
        hidden: width of the head's two hidden layers.
        emb_channels: width of the noise-level embedding.
        sigma_data: data standard deviation of the input scale s(sigma).
        inception_weights: Inception weights file (``feature="inception"``).
        freeze_features: keep the trunk frozen (DG's choice with a noise-aware pretrained encoder); ``False``
            fine-tunes it with the head, from its pretrained weights, on the noisy inputs.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        feature: FeatureName = "classifier",
        hidden: int = 256,
        emb_channels: int = 64,
        sigma_data: float = 0.5,
        inception_weights: str | None = None,
        freeze_features: bool = True,
    ) -> None:
        super().__init__()
        self.data_shape, self.sigma_data = tuple(data_shape), sigma_data
        self.features = feature_trunk(feature, self.data_shape, inception_weights)
        self.freeze_features = freeze_features
        self.features.requires_grad_(not freeze_features)
        self.embed = PositionalEmbedding(emb_channels, endpoint=True)
        self.head = nn.Sequential(
            nn.Linear(self.features.num_features + emb_channels, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def train(self, mode: bool = True) -> TimeDiscriminator:
        super().train(mode)
        if self.freeze_features:
            self.features.eval()  # frozen: never in training mode
        return self

    def input_scale(self, sigma: Tensor) -> Tensor:
        """s(sigma) = 1 / sqrt(1 + sigma^2 / sigma_data^2): (B,) -> (B,)."""
        return (1 + (sigma / self.sigma_data) ** 2).rsqrt()

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x: (B, *S) noisy samples, sigma: (B,) or scalar -> (B,) float32 logits."""
        x = x.float()
        sigma = sigma.float().reshape(-1).expand(x.shape[0])
        scale = self.input_scale(sigma).reshape(-1, *([1] * (x.ndim - 1)))
        z = self.features(scale * x)
        e = self.embed(sigma.log() / 4)
        return self.head(torch.cat([z, e], dim=1)).squeeze(1)


__all__ = ["ClassifierTrunk", "FeatureName", "InceptionTrunk", "PixelTrunk", "TimeDiscriminator", "feature_trunk"]
