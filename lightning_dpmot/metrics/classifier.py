"""Small-data classifier: feature extractor for FID / precision-recall and probabilities for mode mixture.

Inception features mean nothing for 8x8 digits or 2-D points, so small datasets are scored in the feature
space of a small classifier trained on their own training split. :class:`ClassifierFeatures` follows the
feature extractor contract of :mod:`lightning_dpmot.metrics` (``forward(x) -> (B, num_features)``
float32, attributes ``num_features`` and ``name``) and plugs into torchmetrics' FID as a custom ``feature``
module.

Input conventions (``forward``, ``logits``, ``predict_proba``, ``accuracy``):

* ``kind="image"``: images (B, C, H, W) float in [0, 1] (torchmetrics ``normalize=True``); values are clamped
  to [0, 1], and an input reaching below -0.1 is rejected as a [-1, 1] image.
* ``kind="points"``: raw coordinates (B, d) on the data's own scale (e.g. 2-D toy mixtures), standardised
  internally with the training mean and std.

:meth:`ClassifierFeatures.fit` takes the training split as the DataModules yield it (images in [-1, 1], points
raw) and trains deterministically on the CPU: fixed seed for the initialisation, a seeded permutation per
epoch, AdamW with cosine decay. Features are the penultimate layer (SiLU of a ``num_features``-wide linear
layer).
:meth:`ClassifierFeatures.cached` stores the weights under a SHA-256 of the training data, labels,
hyperparameters and :data:`ARCH_VERSION`; ``name`` carries that hash, so cached statistics keyed by ``name``
are invalidated with the classifier.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Kind = Literal["image", "points"]

#: Bump when the architecture or the training procedure changes: invalidates every cached classifier.
ARCH_VERSION = 1

#: Training hyperparameters of :meth:`ClassifierFeatures.fit` and their defaults.
DEFAULT_HPARAMS: dict[str, Any] = {
    "epochs": 15,
    "seed": 0,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "num_features": 128,
    "width": 16,
}


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU()]


def image_trunk(in_channels: int, resolution: int, width: int) -> tuple[nn.Sequential, int]:
    """VGG-style CNN: 3x3 conv + SiLU per scale, average-pooling by 2 until the map is at most 4x4; flatten.

    Channels double per scale from ``width`` up to ``4 * width``.

    Returns:
        ``(trunk, out_dim)``; the trunk maps (B, C, R, R) to (B, out_dim).
    """
    layers, channels, size = _conv_block(in_channels, width), width, resolution
    while size > 4:
        layers += [nn.AvgPool2d(2), *_conv_block(channels, min(2 * channels, 4 * width))]
        channels, size = min(2 * channels, 4 * width), size // 2
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), channels * size * size


def points_trunk(in_dim: int, width: int) -> tuple[nn.Sequential, int]:
    """Two-hidden-layer MLP on standardised coordinates: (B, d) -> (B, 8 * width)."""
    hidden = 8 * width
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()), hidden


def _as_hparams(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(DEFAULT_HPARAMS))
    if unknown:
        raise ValueError(f"unknown classifier hyperparameter(s) {unknown}; expected some of {sorted(DEFAULT_HPARAMS)}")
    return {**DEFAULT_HPARAMS, **overrides}


def _check_training_data(x: Tensor, labels: Tensor) -> Kind:
    if x.ndim not in (2, 4):
        raise ValueError(f"x_train must be images (N, C, H, W) or points (N, d), got shape {tuple(x.shape)}")
    if labels.shape != (len(x),) or labels.dtype.is_floating_point:
        raise ValueError(
            f"labels must be integer class ids of shape ({len(x)},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if len(x) < 2 or int(labels.min()) < 0:
        raise ValueError("need at least 2 training points and labels >= 0")
    if x.ndim == 4 and (x.shape[2] != x.shape[3] or x.shape[2] < 4):
        raise ValueError(f"images must be square and at least 4x4, got {tuple(x.shape[2:])}")
    return "image" if x.ndim == 4 else "points"


def training_digest(x_train: Tensor, labels: Tensor, hparams: dict[str, Any]) -> str:
    """SHA-256 hex digest of the training data bytes, labels, hyperparameters and :data:`ARCH_VERSION`."""
    h = hashlib.sha256(f"ClassifierFeatures/v{ARCH_VERSION}".encode())
    x = np.ascontiguousarray(x_train.detach().cpu().float().numpy())
    h.update(json.dumps({"shape": list(x.shape), "hparams": hparams}, sort_keys=True).encode())
    h.update(x.tobytes())
    h.update(np.ascontiguousarray(labels.detach().cpu().long().numpy()).tobytes())
    return h.hexdigest()


class ClassifierFeatures(nn.Module):
    """Classifier whose penultimate layer is a feature extractor (input conventions: module docstring).

    Args:
        kind: ``"image"`` (CNN) or ``"points"`` (MLP).
        in_shape: shape of one input, (C, H, W) or (d,).
        num_classes: K.
        num_features: width of the feature (penultimate) layer.
        width: base channels of the CNN (the MLP has ``8 * width`` hidden units).
        name: stable identifier (set by :meth:`fit` to include the training digest).
    """

    shift: Tensor
    scale: Tensor

    def __init__(
        self,
        kind: Kind,
        in_shape: tuple[int, ...],
        num_classes: int,
        num_features: int = 128,
        width: int = 16,
        name: str = "classifier-untrained",
    ) -> None:
        super().__init__()
        if kind not in ("image", "points"):
            raise ValueError(f"kind must be 'image' or 'points', got {kind!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.kind, self.in_shape, self.num_classes = kind, tuple(in_shape), num_classes
        self.num_features, self.width, self.name = num_features, width, name
        if kind == "image":
            self.trunk, trunk_dim = image_trunk(in_shape[0], in_shape[1], width)
        else:
            self.trunk, trunk_dim = points_trunk(in_shape[0], width)
        self.feature_layer = nn.Sequential(nn.Linear(trunk_dim, num_features), nn.SiLU())
        self.head = nn.Linear(num_features, num_classes)
        # Network input = (x - shift) / scale: [0, 1] images -> [-1, 1]; points -> standardised.
        self.register_buffer("shift", torch.full(self.in_shape[:1], 0.5))
        self.register_buffer("scale", torch.full(self.in_shape[:1], 0.5))

    def _network_input(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.in_shape or x.ndim != len(self.in_shape) + 1:
            raise ValueError(
                f"{self.name} expects input of shape (B, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}"
            )
        x = x.float()
        if self.kind == "points":
            return (x - self.shift) / self.scale
        if x.numel() and float(x.min()) < -0.1:
            raise ValueError(
                f"{self.name} takes images in [0, 1]; got values down to {float(x.min()):.3f} "
                "(convert [-1, 1] with (x + 1) / 2)"
            )
        shift, scale = (rearrange(t, "c -> 1 c 1 1") for t in (self.shift, self.scale))
        return (x.clamp(0.0, 1.0) - shift) / scale

    def _features(self, net_input: Tensor) -> Tensor:
        return self.feature_layer(self.trunk(net_input))

    def forward(self, x: Tensor) -> Tensor:
        """Penultimate-layer features: (B, *in_shape) -> (B, num_features) float32."""
        return self._features(self._network_input(x))

    def logits(self, x: Tensor) -> Tensor:
        """Class logits: (B, *in_shape) -> (B, K)."""
        return self.head(self.forward(x))

    def predict_proba(self, x: Tensor) -> Tensor:
        """Softmax class probabilities: (B, *in_shape) -> (B, K), rows summing to 1."""
        return self.logits(x).softmax(dim=-1)

    @torch.no_grad()
    def accuracy(self, x: Tensor, labels: Tensor, batch_size: int = 512) -> float:
        """Top-1 accuracy on (N, *in_shape) inputs (forward convention) with (N,) labels."""
        correct = sum(
            int((self.logits(x[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size].to(x.device)).sum())
            for i in range(0, len(x), batch_size)
        )
        return correct / len(x)

    @classmethod
    @torch.inference_mode(False)
    def fit(
        cls,
        x_train: Tensor,
        labels: Tensor,
        *,
        epochs: int = DEFAULT_HPARAMS["epochs"],
        seed: int = DEFAULT_HPARAMS["seed"],
        batch_size: int = DEFAULT_HPARAMS["batch_size"],
        lr: float = DEFAULT_HPARAMS["lr"],
        weight_decay: float = DEFAULT_HPARAMS["weight_decay"],
        num_features: int = DEFAULT_HPARAMS["num_features"],
        width: int = DEFAULT_HPARAMS["width"],
    ) -> ClassifierFeatures:
        """Train on the CPU, deterministically, and return the classifier in eval mode.

        Args:
            x_train: (N, C, H, W) images in [-1, 1] or (N, d) raw points: the training split.
            labels: (N,) int64 class ids.
            epochs, seed, batch_size, lr, weight_decay: AdamW with cosine decay over ``epochs`` passes.
            num_features, width: architecture (see the class).
        """
        hparams = _as_hparams(
            dict(
                epochs=epochs,
                seed=seed,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                num_features=num_features,
                width=width,
            )
        )
        kind = _check_training_data(x_train, labels)
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
        name = f"classifier-{kind}-{training_digest(x_train, labels, hparams)[:12]}"
        x, y = x_train.detach().cpu().float(), labels.detach().cpu().long()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(kind, tuple(x.shape[1:]), int(y.max()) + 1, num_features, width, name)
        if kind == "points":
            model.shift.copy_(x.mean(0))
            model.scale.copy_(x.std(0).clamp_min(1e-6))
            net_input = (x - model.shift) / model.scale
        else:
            net_input = x  # [-1, 1] is the network's input scale
        train_classifier(model, net_input, y, hparams)
        return model.eval()

    @classmethod
    def cached(
        cls, x_train: Tensor, labels: Tensor, cache_dir: str | os.PathLike[str], **hparams: Any
    ) -> ClassifierFeatures:
        """:meth:`fit` once; later calls load ``cache_dir/<name>.pt`` (``torch.load``, ``weights_only``)."""
        full = _as_hparams(hparams)
        kind = _check_training_data(x_train, labels)
        path = Path(cache_dir) / f"classifier-{kind}-{training_digest(x_train, labels, full)[:12]}.pt"
        if path.is_file():
            return cls.load(path)
        model = cls.fit(x_train, labels, **full)
        model.save(path)
        return model

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write config and weights atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "arch_version": ARCH_VERSION,
            "kind": self.kind,
            "in_shape": list(self.in_shape),
            "num_classes": self.num_classes,
            "num_features": self.num_features,
            "width": self.width,
            "name": self.name,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClassifierFeatures:
        """Rebuild a classifier written by :meth:`save` (eval mode, CPU)."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("arch_version") != ARCH_VERSION:
            raise ValueError(
                f"{path}: classifier architecture v{payload.get('arch_version')}, this code is v{ARCH_VERSION}"
            )
        model = cls(
            payload["kind"],
            tuple(payload["in_shape"]),
            payload["num_classes"],
            payload["num_features"],
            payload["width"],
            payload["name"],
        )
        model.load_state_dict(payload["state_dict"])
        return model.eval()


def train_classifier(model: ClassifierFeatures, net_input: Tensor, labels: Tensor, hparams: dict[str, Any]) -> None:
    """Cross-entropy on network-scale inputs (N, ...): seeded minibatch order, cosine-decayed AdamW.

    Works under inference mode / no_grad as well. Runs single-threaded: the ops are too small to gain from
    intra-op parallelism (on a loaded machine extra
    threads make it several times slower), and the weights then do not depend on the machine's thread count.
    """
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Callers may be inside Lightning's validation/test (inference mode, no grad): training needs autograd
        # and tensors that are not inference tensors.
        with torch.inference_mode(False), torch.enable_grad():
            _train_loop(model, net_input.clone(), labels.clone(), hparams)
    finally:
        torch.set_num_threads(num_threads)


def _train_loop(model: ClassifierFeatures, net_input: Tensor, labels: Tensor, hparams: dict[str, Any]) -> None:
    generator = torch.Generator().manual_seed(hparams["seed"])
    batch_size = min(hparams["batch_size"], len(net_input))
    steps_per_epoch = len(net_input) // batch_size  # drop the ragged last batch: equal-sized steps
    total = hparams["epochs"] * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    model.train()
    step = 0
    for _ in range(hparams["epochs"]):
        order = torch.randperm(len(net_input), generator=generator)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            for group in optimizer.param_groups:
                group["lr"] = hparams["lr"] * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model.head(model._features(net_input[idx])), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
