"""NVlabs/edm networks as this project's nets: name mapping, net config and a Lightning checkpoint for EDMModule.

Name mapping: EDM's ``EDMPrecond`` holds its ``SongUNet`` as ``model``; :class:`~lightning_dpmot.models.EDMModule`
holds :class:`~lightning_dpmot.nets.DDPMppUNet` as ``denoiser.raw_net``. Below that prefix every name is equal
(``enc.32x32_conv.weight``, ``dec.16x16_block3.qkv.weight``, ``map_noise.freqs`` …), so the mapping is the prefix
``model.`` <-> ``denoiser.raw_net.``. EDM's preconditioning (``EDMPrecond``) is
:class:`~lightning_dpmot.diffusion.edm.EDMPrecond`, with ``sigma_data`` as its only parameter.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_dpmot.utils.checkpoint_io import CheckpointError
from lightning_dpmot.utils.edm_pickle import edm_state_dict

EDM_PREFIX = "model."
PROJECT_PREFIX = "denoiser.raw_net."
#: ``SongUNet``'s defaults (EDM's ``training/networks.py``); its init_kwargs hold only the arguments passed.
SONGUNET_DEFAULTS: dict[str, Any] = {
    "augment_dim": 0,
    "model_channels": 128,
    "channel_mult": [1, 2, 2, 2],
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attn_resolutions": [16],
    "dropout": 0.10,
    "label_dropout": 0,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
}
_NET_ARGS = (
    "model_channels",
    "channel_mult",
    "num_blocks",
    "attn_resolutions",
    "dropout",
    "channel_mult_noise",
    "channel_mult_emb",
    "embedding_type",
    "encoder_type",
    "resample_filter",
    "augment_dim",
)


def edm_to_project_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EDM ``EDMPrecond`` names (``model.…``) -> EDMModule names (``denoiser.raw_net.…``)."""
    out = {}
    for name, tensor in state.items():
        if not name.startswith(EDM_PREFIX):
            raise CheckpointError(f"EDM parameter {name!r} lies outside the precond's 'model' network")
        out[PROJECT_PREFIX + name.removeprefix(EDM_PREFIX)] = tensor
    return out


def project_to_edm_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`edm_to_project_state_dict` (keys outside ``denoiser.raw_net.`` are dropped)."""
    return {EDM_PREFIX + k.removeprefix(PROJECT_PREFIX): v for k, v in state.items() if k.startswith(PROJECT_PREFIX)}


def project_config(info: dict[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """EDMModule hyperparameters (as ``dpmot fit`` records them) for an EDM network described by ``info``.

    ``num_classes`` is the dataset's class count, which ``dpmot`` checks against the data module; it defaults to
    the net's ``label_dim``. An unconditional net (``label_dim == 0``) may name its dataset's classes (CIFAR-10: 10);
    a conditional one must keep ``label_dim``.

    Raises:
        CheckpointError: a precond other than EDMPrecond, a net other than SongUNet, or a "skip" decoder.
    """
    if info.get("class_name") != "EDMPrecond":
        raise CheckpointError(
            f"EDM network class {info.get('class_name')!r} is not supported (only EDMPrecond; VP/VE/iDDPM "
            "preconditionings differ)"
        )
    precond = dict(info.get("init_kwargs") or {})
    kwargs = {**SONGUNET_DEFAULTS, **{k: v for k, v in precond.items() if k in SONGUNET_DEFAULTS}}
    kwargs.update({k: v for k, v in (info.get("model_init_kwargs") or {}).items() if k in SONGUNET_DEFAULTS})
    model_type = precond.get("model_type", info.get("model_class") or "DhariwalUNet")
    if info.get("model_class") != "SongUNet" or model_type != "SongUNet":
        raise CheckpointError(f"EDM model {info.get('model_class')!r} is not supported (only SongUNet: DDPM++/NCSN++)")
    if kwargs["decoder_type"] != "standard":
        raise CheckpointError(f"SongUNet decoder_type {kwargs['decoder_type']!r} is not supported (only 'standard')")
    channels = int(info.get("img_channels", precond.get("img_channels", 3)))
    resolution = int(info.get("img_resolution", precond.get("img_resolution", 32)))
    label_dim = int(info.get("label_dim", precond.get("label_dim", 0)))
    num_classes = label_dim if num_classes is None else int(num_classes)
    if num_classes < 0 or (label_dim and num_classes != label_dim):
        raise CheckpointError(f"num_classes={num_classes} does not fit an EDM net with label_dim={label_dim}")
    sigma_min, sigma_max = float(info.get("sigma_min", 0.0)), float(info.get("sigma_max", float("inf")))
    if not 0 < sigma_min < sigma_max < float("inf"):  # EDMPrecond's defaults (0, inf): EDM's sampler defaults
        sigma_min, sigma_max = 0.002, 80.0
    net_args = {name: kwargs[name] for name in _NET_ARGS}
    net_args["channel_mult"] = [int(m) for m in net_args["channel_mult"]]
    net_args["attn_resolutions"] = [int(r) for r in net_args["attn_resolutions"]]
    net_args["resample_filter"] = [int(t) for t in net_args["resample_filter"]]
    init_args = {"num_classes": label_dim, **net_args, "num_heads": 1, "context_dim": 0, "cross_attn_resolutions": []}
    return {
        "_class_path": "lightning_dpmot.models.EDMModule",
        "net": {"class_path": "lightning_dpmot.nets.DDPMppUNet", "init_args": init_args},
        "sigma_data": float(info.get("sigma_data", 0.5)),
        "P_mean": -1.2,
        "P_std": 1.2,
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "data_shape": (channels, resolution, resolution),
        "num_classes": num_classes,
        "class_conditional": label_dim > 0,
        "label_dropout": float(kwargs["label_dropout"]),
        "optimizer": "lightning_dpmot.models.base.adam",
        "lr_warmup_images": 0,
        "seed": None,
        "nan_to_num_grads": True,
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }


def edm_checkpoint(
    path: str | os.PathLike[str], key: str = "ema", sha256: str | None = None, num_classes: int | None = None
) -> dict[str, Any]:
    """A Lightning checkpoint dictionary (as ``dpmot fit`` writes for EDMModule + DDPMppUNet) of an EDM pickle;
    ``num_classes`` as for :func:`project_config`."""
    import lightning

    state, info = edm_state_dict(path, key, sha256)
    hparams = project_config(info, num_classes)
    return {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": {k: v.float().contiguous() for k, v in edm_to_project_state_dict(state).items()},
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "edm_source": {"file": os.fspath(path), "key": key, "class_name": info["class_name"]},
    }
