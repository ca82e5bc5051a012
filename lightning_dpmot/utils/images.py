"""Image helpers without torchvision: [-1, 1] tensors to uint8, grids, PNG files, 2-D scatter plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """x: (..., C, H, W) in [-1, 1] -> uint8 in [0, 255] (EDM's rounding: (x * 127.5 + 128).clamp(0, 255)).

    Raises:
        ValueError: ``x`` holds NaN/inf (a cast would silently turn them into black or white pixels).
    """
    x = x.detach().float()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"to_uint8: {bad} of {x.numel()} values are NaN/inf (shape {tuple(x.shape)}); refusing to write them as "
            "black/white pixels"
        )
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def make_grid(x: Tensor, nrow: int | None = None, padding: int = 1) -> Tensor:
    """Tile images into one picture.

    Args:
        x: (B, C, H, W) in [-1, 1].
        nrow: images per row (default: ceil(sqrt(B))).
        padding: pixels of background (-1) between images.
    Returns:
        (C, rows * (H + padding) + padding, nrow * (W + padding) + padding) in [-1, 1].
    """
    if x.ndim != 4:
        raise ValueError(f"make_grid expects (B, C, H, W), got shape {tuple(x.shape)}")
    b = x.shape[0]
    ncol = nrow or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncol)
    fill = x.new_full((nrows * ncol - b, *x.shape[1:]), -1.0)
    x = torch.cat([x, fill])
    x = torch.nn.functional.pad(x, (padding, 0, padding, 0), value=-1.0)
    grid = rearrange(x, "(r c) ch h w -> ch (r h) (c w)", r=nrows, c=ncol)
    return torch.nn.functional.pad(grid, (0, padding, 0, padding), value=-1.0)


def save_png(x: Tensor, path: str | Path) -> Path:
    """Save one image x: (C, H, W) in [-1, 1] (C = 1 or 3) as PNG."""
    arr = rearrange(to_uint8(x).cpu(), "c h w -> h w c").numpy()
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def upscale_nearest(x: Tensor, min_size: int = 512, max_factor: int = 16) -> Tensor:
    """Enlarge an image (C, H, W) by the smallest integer factor that makes its longer side >= ``min_size`` (at most
    ``max_factor``), repeating pixels (nearest neighbour: no blur, every generated pixel stays visible)."""
    factor = max(1, min(max_factor, math.ceil(min_size / max(x.shape[-2:]))))
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def save_grid(x: Tensor, path: str | Path, title: str = "", nrow: int | None = None, min_size: int = 512) -> Path:
    """Images x (B, C, H, W) in [-1, 1] as one readable PNG: a grid (:func:`make_grid`) enlarged by
    :func:`upscale_nearest` to at least ``min_size`` pixels, with ``title`` on a white strip above it."""
    from PIL import ImageDraw, ImageFont

    grid = upscale_nearest(make_grid(x, nrow), min_size)
    arr = rearrange(to_uint8(grid).cpu(), "c h w -> h w c").numpy()
    image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")
    if title:
        font = ImageFont.load_default(size=max(12, image.width // 40))
        box = ImageDraw.Draw(image).textbbox((0, 0), title, font=font)
        strip = box[3] - box[1] + 12
        canvas = Image.new("RGB", (image.width, image.height + strip), "white")
        canvas.paste(image, (0, strip))
        ImageDraw.Draw(canvas).text((6, 6 - box[1]), title, fill="black", font=font)
        image = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def save_scatter(points: Tensor, path: str | Path, reference: Tensor | None = None, title: str = "") -> Path:
    """Scatter plot of 2-D samples (N, 2), optionally over reference data, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="lightgray", label="data")
    pts = np.asarray(points.detach().cpu())
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def save_captioned_grid(x: Tensor, captions: list[str], path: str | Path, ncol: int = 8, title: str = "") -> Path:
    """Images x (B, C, H, W) in [-1, 1] in a grid with each image's prompt written under it, as PNG.

    Tiles are shown at a readable size (nearest-neighbour upscaling, 1.6 inches each) with the caption wrapped to
    the tile's width.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(captions) != len(x):
        raise ValueError(f"save_captioned_grid: {len(x)} images but {len(captions)} captions")
    images = rearrange(to_uint8(x).cpu(), "b c h w -> b h w c").numpy()
    ncol = min(ncol, len(images))
    nrow = math.ceil(len(images) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.6 * ncol, 2.2 * nrow), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, text in zip(axes.flat, images, captions, strict=False):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", interpolation="nearest", vmin=0, vmax=255)
        caption = "\n".join(textwrap.wrap(text, 24)[:4])
        ax.text(0.5, -0.04, caption, transform=ax.transAxes, ha="center", va="top", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
