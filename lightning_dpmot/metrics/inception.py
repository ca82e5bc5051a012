"""FID Inception-v3 (the TensorFlow ``inception-2015-12-05`` graph) in pure torch, without torchvision.

This is the network behind the standard FID numbers (TTUR, pytorch-fid, torch-fidelity, torchmetrics). It
differs from torchvision's Inception-v3 in ways that change the features:

* input: 8-bit pixel values v in [0, 255], resized to 299x299 with TensorFlow 1.x bilinear interpolation
  (``align_corners=False``, no half-pixel centres), then normalised as ``(v - 128) / 128``;
* the average-pool branches of the A, C and E blocks ignore the zero padding (``count_include_pad=False``);
* the last E block (``Mixed_7c``) uses a *max* pool in its pool branch;
* batch norm with eps = 1e-3, a 1008-way classifier ``fc`` (only used for logits);
* the FID feature is the 2048-d global average pool ("pool3").

Weights: torch-fidelity's conversion of the TF graph, ``weights-inception-2015-12-05-6726825d.pth`` (a plain
state dict of 472 tensors; module names below follow it). Nothing here downloads unless
:func:`download_inception_weights` is called explicitly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from einops import reduce, repeat
from torch import Tensor, nn

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILENAME}"
#: Full SHA-256 of the weights file; the 8 hex digits in its name are the first 8 (pytorch-fid's
#: ``pt_inception-2015-12-05-6726825d.pth`` has the same digest).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_SHA256_PREFIX = WEIGHTS_SHA256[:8]
WEIGHTS_ENV_VAR = "DPMOT_INCEPTION_WEIGHTS"
INPUT_SIZE = 299


def resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize exactly as TensorFlow 1.x ``resize_bilinear(align_corners=False)``.

    Output pixel i samples the input at ``i * (in / out)`` (no half-pixel offset), so downscaling by an
    integer factor picks pixels instead of averaging them, and the last rows/columns repeat the border when
    upscaling.

    Args:
        x: (B, C, H, W) float tensor.
        size: output (h, w).

    Returns:
        (B, C, h, w) tensor of x's dtype.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor of shape (B, C, H, W), got {x.dtype} {tuple(x.shape)}")

    def _axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32) * scale
        lo = src.floor().long()
        hi = (lo + 1).clamp_max(n_in - 1)
        frac = (src - lo.to(torch.float32)).to(device=x.device, dtype=x.dtype)
        return lo.to(x.device), hi.to(x.device), frac

    y_lo, y_hi, dy = _axis(x.shape[-2], size[0])
    x_lo, x_hi, dx = _axis(x.shape[-1], size[1])
    top, bottom = x.index_select(-2, y_lo), x.index_select(-2, y_hi)
    top_l, top_r = top.index_select(-1, x_lo), top.index_select(-1, x_hi)
    bot_l, bot_r = bottom.index_select(-1, x_lo), bottom.index_select(-1, x_hi)
    top = top_l + (top_r - top_l) * dx
    bottom = bot_l + (bot_r - bot_l) * dx
    return top + (bottom - top) * dy[:, None]


class FrozenBatchNorm2d(nn.Module):
    """Inference-only batch norm with the four tensors of the weights file (no ``num_batches_tracked``).

    Args:
        num_features: channels C.
        eps: TF's batch-norm epsilon (1e-3 in this graph).
    """

    def __init__(self, num_features: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W), always with the running statistics."""
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Module):
    """Bias-free convolution, batch norm, ReLU (TF's ``conv2d_params`` + ``batchnorm``).

    Args:
        c_in: input channels.
        c_out: output channels.
        kernel: kernel size (int or (kh, kw)).
        stride: stride.
        padding: zero padding (int or (ph, pw)).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, H, W) -> (B, c_out, H', W')."""
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: Tensor) -> Tensor:
    """3x3 stride-1 'SAME' average pool that, like TF, averages only over in-image pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (TF ``mixed``..``mixed_2``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1.

    Args:
        c_in: input channels.
        pool_features: channels of the pool branch (output: 224 + pool_features).
    """

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, 35, 35) -> (B, 224 + pool_features, 35, 35)."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))], dim=1)


class InceptionB(nn.Module):
    """35 -> 17 grid reduction (TF ``mixed_3``): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2; c_in + 480 channels."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, 35, 35) -> (B, c_in + 480, 17, 17)."""
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF ``mixed_4``..``mixed_7``); output 768 channels.

    Args:
        c_in: input channels.
        c7: width of the 7x7 towers.
    """

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, 17, 17) -> (B, 768, 17, 17)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_same(x))], dim=1)


class InceptionD(nn.Module):
    """17 -> 8 grid reduction (TF ``mixed_8``): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2; c_in + 512."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, 17, 17) -> (B, c_in + 512, 8, 8)."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (TF ``mixed_9``, ``mixed_10``); output 2048 channels.

    Args:
        c_in: input channels.
        pool: pool branch type: ``"avg"`` (``Mixed_7b``) or ``"max"`` (``Mixed_7c``, a quirk of the TF graph).
    """

    def __init__(self, c_in: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, 8, 8) -> (B, 2048, 8, 8)."""
        t = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_same(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(t),
                self.branch3x3_2b(t),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_weights_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (``TORCH_HOME`` default: ``~/.cache/torch``): torch-fidelity cache."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """Finds the weights file without downloading.

    Order: the explicit ``weights_path`` (a file, or a directory holding ``WEIGHTS_FILENAME``; if given it
    must exist); ``$DPMOT_INCEPTION_WEIGHTS`` (file or directory);
    ``$TORCH_HOME/hub/checkpoints/WEIGHTS_FILENAME``.

    Raises:
        FileNotFoundError: naming the file, every path searched and how to obtain the weights.
    """

    def _candidate(p: str | os.PathLike) -> Path:
        path = Path(p).expanduser()
        return path / WEIGHTS_FILENAME if path.is_dir() else path

    if weights_path is not None:
        searched = [(_candidate(weights_path), "weights_path argument")]
    else:
        searched = []
        if os.environ.get(WEIGHTS_ENV_VAR):
            searched.append((_candidate(os.environ[WEIGHTS_ENV_VAR]), f"${WEIGHTS_ENV_VAR}"))
        searched.append((default_weights_dir() / WEIGHTS_FILENAME, "$TORCH_HOME/hub/checkpoints"))
    for path, _ in searched:
        if path.is_file():
            return path
    lines = "\n".join(f"  - {path} ({origin})" for path, origin in searched)
    raise FileNotFoundError(
        f"Inception-v3 FID weights '{WEIGHTS_FILENAME}' not found. Searched:\n{lines}\n"
        f"Download {WEIGHTS_URL} (sha256 {WEIGHTS_SHA256}), e.g. with\n"
        f"  python -c 'from lightning_dpmot.metrics.inception import download_inception_weights as d; d()'\n"
        f"and pass weights_path=<file>, set ${WEIGHTS_ENV_VAR}=<file>, or put it in {default_weights_dir()}."
    )


def download_inception_weights(dest: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Downloads the weights and checks their full sha256 (never called implicitly).

    Args:
        dest: target file or directory (default: ``$TORCH_HOME/hub/checkpoints``).
        progress: show a progress bar.

    Returns:
        Path of the verified file.
    """
    target = Path(dest).expanduser() if dest is not None else default_weights_dir()
    if target.is_dir() or dest is None:
        target = target / WEIGHTS_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(WEIGHTS_URL, str(target), hash_prefix=WEIGHTS_SHA256, progress=progress)
    return target


def load_inception_state_dict(path: str | os.PathLike, verify_hash: bool = True) -> dict[str, Tensor]:
    """Loads the torch-fidelity state dict with ``weights_only=True``.

    Args:
        path: the ``.pth`` file.
        verify_hash: require the file's sha256 to be ``WEIGHTS_SHA256`` (all 64 hex digits).

    Returns:
        Mapping of parameter/buffer names to tensors (``num_batches_tracked`` entries dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}")
    if verify_hash:
        digest = _sha256(path)
        if digest != WEIGHTS_SHA256:
            raise ValueError(
                f"sha256 of {path} is {digest}, expected {WEIGHTS_SHA256} "
                f"(the file is not {WEIGHTS_FILENAME}, or it is truncated); re-download {WEIGHTS_URL}"
            )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors)")
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


class InceptionV3Features(nn.Module):
    """2048-d pool3 features of the FID Inception-v3; a torchmetrics ``feature`` module.

    Args:
        weights_path: weights file or directory; see :func:`resolve_inception_weights` for the search order.
        verify_hash: check the file's full sha256 when loading (disable only for test fixtures).
        quantize: round [0, 1] float input to 8-bit levels first, as when images are saved as PNG (the
            standard protocol); ``False`` feeds the exact float values.
        pretrained: load weights (``False``: random initialisation, for shape checks only).
    """

    num_features: int = 2048

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        verify_hash: bool = True,
        quantize: bool = True,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.quantize = quantize
        self.name = "inception-2015-12-05" if quantize else "inception-2015-12-05-float"
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        if pretrained:
            path = resolve_inception_weights(weights_path)
            state = load_inception_state_dict(path, verify_hash=verify_hash)
            expected = self.state_dict()
            missing = sorted(set(expected) - set(state))
            unexpected = sorted(set(state) - set(expected))
            if missing or unexpected:
                raise ValueError(
                    f"{path} does not match the FID Inception layout: missing keys {missing[:5]}"
                    f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                    f"{' ...' if len(unexpected) > 5 else ''}"
                )
            bad = [k for k, v in state.items() if v.shape != expected[k].shape]
            if bad:
                raise ValueError(
                    f"{path}: wrong shape for {bad[0]}: {tuple(state[bad[0]].shape)} "
                    f"instead of {tuple(expected[bad[0]].shape)}"
                )
            self.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def _to_pixels(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] (or uint8) -> (B, 3, H, W) pixel values in [0, 255], weights' dtype."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
        dtype = self.fc.weight.dtype
        if x.dtype == torch.uint8:
            v = x.to(dtype)
        elif x.is_floating_point():
            v = x.to(dtype).clamp(0.0, 1.0) * 255.0
            if self.quantize:
                v = torch.floor(v + 0.5)
        else:
            raise ValueError(f"expected float images in [0, 1] or uint8 images, got dtype {x.dtype}")
        if v.shape[1] == 1:
            v = repeat(v, "b 1 h w -> b 3 h w")
        return v

    def forward(self, x: Tensor) -> Tensor:
        """Pool3 features.

        Args:
            x: (B, C, H, W) float in [0, 1] (torchmetrics' ``normalize=True``) or uint8 in [0, 255];
                C in {1, 3}.

        Returns:
            (B, 2048) float32, computed in the weights' dtype even under autocast (bf16 would shift FID).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._pool3(x)

    def _pool3(self, x: Tensor) -> Tensor:
        v = resize_bilinear_tf1(self._to_pixels(x), (INPUT_SIZE, INPUT_SIZE))
        h = (v - 128.0) / 128.0
        h = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(h)))
        h = F.max_pool2d(h, kernel_size=3, stride=2)
        h = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(h))
        h = F.max_pool2d(h, kernel_size=3, stride=2)
        for name, block in self.named_children():  # Mixed_5b .. Mixed_7c, in registration order
            if name.startswith("Mixed_"):
                h = block(h)
        return reduce(h, "b c h w -> b c", "mean").to(torch.float32)

    def logits(self, features: Tensor, unbiased: bool = True) -> Tensor:
        """1008-way classifier logits from pool3 features (``unbiased``: without the bias, as for the IS).

        Args:
            features: (B, 2048) output of :meth:`forward`.

        Returns:
            (B, 1008) float32.
        """
        w = self.fc.weight
        out = features.to(w.dtype) @ w.T
        return (out if unbiased else out + self.fc.bias).to(torch.float32)
