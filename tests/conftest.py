"""Shared test setup: offline, quiet, small thread count; a fake CIFAR-10 folder for config tests."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: on a shared 2-core box two threads under contention run ~10x slower,
    and results are bit-reproducible only for a fixed thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet_trainer(root: Path | str, **kwargs: object) -> L.Trainer:
    """A CPU Trainer without logger, progress bar or model summary, rooted at ``root``; ``kwargs`` add or override."""
    defaults: dict[str, object] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }
    return L.Trainer(**{**defaults, **kwargs})  # type: ignore[arg-type]


def write_fake_cifar10(root: Path, per_batch: int = 420, test_size: int = 8, seed: int = 0) -> Path:
    """Write the six CIFAR-10 python pickle batches with random pixels into ``root/cifar-10-batches-py``
    (5 x 420 training images: enough for the AOT configs' pools of 2048)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test_size if name == "test_batch" else per_batch
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.fixture
def fake_cifar10(tmp_path: Path) -> Path:
    return write_fake_cifar10(tmp_path / "cifar")


def tiny_unet(**overrides: object):
    """A DDPM++ U-Net factory small enough for CPU tests (8x8 or 16x16 images)."""
    from functools import partial

    from lightning_dpmot.nets import DDPMppUNet

    kwargs = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    kwargs.update(overrides)
    return partial(DDPMppUNet, **kwargs)


def tiny_edm(data_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, **kwargs: object):
    from lightning_dpmot.models import EDMModule

    kwargs.setdefault("net", tiny_unet())
    return EDMModule(data_shape=data_shape, num_classes=num_classes, **kwargs)


def tiny_text2img(data_shape: tuple[int, ...] = (3, 16, 16), **kwargs: object):
    """A TextToImageModule with a tiny cross-attention U-Net and a tiny random T5 encoder (C = 16), for CPU tests."""
    from functools import partial

    from lightning_dpmot.models import TextToImageModule
    from lightning_dpmot.nets import DDPMppUNet
    from lightning_dpmot.nets.text_encoder import TextEncoder

    cross = [data_shape[-1] // 2]
    net = partial(
        DDPMppUNet,
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        cross_attn_resolutions=cross,
    )
    kwargs.setdefault("text_encoder", TextEncoder.tiny_random(dim=16))
    return TextToImageModule(net, data_shape=data_shape, **kwargs)


def tiny_edm_checkpoint(root: Path, class_conditional: bool = False) -> Path:
    """A tiny EDM on digits trained 2 steps through ``dpmot fit`` (so its hparams carry the class_path);
    returns ``root/last.ckpt``."""
    import yaml

    from lightning_dpmot.cli import main

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "lightning_dpmot.callbacks.LastCheckpoint",
                    "init_args": {"dirpath": str(root), "save_last": True, "save_top_k": 0},
                }
            ],
        },
        "model": {
            "class_path": "lightning_dpmot.models.EDMModule",
            "init_args": {
                "class_conditional": class_conditional,
                "net": {
                    "class_path": "lightning_dpmot.nets.DDPMppUNet",
                    "init_args": {"model_channels": 8, "channel_mult": [1, 1], "num_blocks": 1, "attn_resolutions": []},
                },
            },
        },
        "data": {"class_path": "lightning_dpmot.data.DigitsDataModule", "init_args": {"batch_size": 16}},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "edm.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(root / "edm.yaml")])
    return root / "last.ckpt"
