"""NVlabs/edm pickles: loaded as data (no code from the pickle runs), mapped exactly onto EDMModule + DDPMppUNet.

The fixture writes a fake ``torch_utils.persistence`` / ``dnnlib.util`` package into tmp_path and pickles a tiny
project net in EDM's structure: every module a ``_reconstruct_persistent_obj(meta)`` record (``meta`` with
``module_src``, ``class_name`` and the module's ``__dict__`` with ``_parameters``/``_buffers``/``_modules``), the
``enc``/``dec`` containers real ``torch.nn.ModuleDict``\\ s, parameters ``nn.Parameter``\\ s, ``init_kwargs`` an
EasyDict.
The fake reconstruct function ``exec``\\ s ``module_src`` like EDM's, so a loader that called it would be caught.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_edm
from torch import nn

from lightning_dpmot.convert_edm import main as convert_main
from lightning_dpmot.nets import DDPMppUNet
from lightning_dpmot.nets.edm_import import edm_checkpoint, project_to_edm_state_dict
from lightning_dpmot.utils.checkpoint_io import CheckpointError, load_lightning_module
from lightning_dpmot.utils.edm_pickle import edm_state_dict, load_edm_pickle

PERSISTENCE_SRC = """
import pickle
_version = 6

def _reconstruct_persistent_obj(meta):
    namespace = {}
    exec(meta["module_src"], namespace)  # what EDM does; the loader under test must never get here
    return namespace

class Record:
    def __init__(self, class_name, module_src, state):
        self.class_name, self.module_src, self.state = class_name, module_src, state

    def __reduce__(self):
        meta = dict(type="class", version=_version, module_src=self.module_src, class_name=self.class_name,
                    state=self.state)
        return (_reconstruct_persistent_obj, (meta,), None)
"""
EASYDICT_SRC = """
class EasyDict(dict):
    def __getattr__(self, name):
        return self[name]
"""
EDM_NAMES = {"DDPMppUNet": "SongUNet", "ClassEmbedding": "Linear"}
NETS = {
    "ddpmpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0),
    "ncsnpp": dict(
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.0,
        embedding_type="fourier",
        encoder_type="residual",
        channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1],
        augment_dim=9,
    ),
}


@pytest.fixture
def fake_edm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The fake EDM package on sys.path while the pickles are written; removed again afterwards."""
    root = tmp_path / "fake_edm"
    for pkg, mod, src in (("torch_utils", "persistence", PERSISTENCE_SRC), ("dnnlib", "util", EASYDICT_SRC)):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
        (root / pkg / f"{mod}.py").write_text(src)
    monkeypatch.syspath_prepend(str(root))
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import dnnlib.util
    import torch_utils.persistence

    yield torch_utils.persistence, dnnlib.util
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        sys.modules.pop(name, None)


def edm_record(module: nn.Module, persistence: Any, module_src: str) -> Any:
    """A project module as EDM pickles it (ModuleDicts stay torch containers; the rest persistence records)."""
    children = OrderedDict((k, edm_record(m, persistence, module_src)) for k, m in module._modules.items())
    params = OrderedDict(
        (k, None if p is None else nn.Parameter(p.detach().clone())) for k, p in module._parameters.items()
    )
    buffers = OrderedDict(
        (k, None if b is None else b.clone())
        for k, b in module._buffers.items()
        if k not in module._non_persistent_buffers_set
    )
    if isinstance(module, nn.ModuleDict):
        container = nn.ModuleDict()
        container._modules = children  # type: ignore[assignment]
        return container
    state = {
        "training": False,
        "_parameters": params,
        "_buffers": buffers,
        "_non_persistent_buffers_set": set(),
        "_modules": children,
    }
    name = type(module).__name__
    return persistence.Record(EDM_NAMES.get(name, name), module_src, state)


def write_edm_pickle(path: Path, module: Any, fake: Any, kind: str, module_src: str = "X = 1\n") -> Path:
    """Pack ``module.denoiser`` as ``dict(ema=EDMPrecond(model=SongUNet), …)`` like EDM's training loop."""
    persistence, util = fake
    net = module.denoiser.raw_net
    channels, resolution = module.data_shape[0], module.data_shape[1]
    label_dim = module.num_classes if module.class_conditional else 0
    kwargs = util.EasyDict(
        img_resolution=resolution,
        img_channels=channels,
        label_dim=label_dim,
        use_fp16=False,
        model_type="SongUNet",
        **NETS[kind],
    )
    model = edm_record(net, persistence, module_src)
    model.state["_init_kwargs"] = dict(
        img_resolution=resolution, in_channels=channels, out_channels=channels, label_dim=label_dim, **NETS[kind]
    )
    precond = persistence.Record(
        "EDMPrecond",
        module_src,
        {
            "training": False,
            "_parameters": OrderedDict(),
            "_buffers": OrderedDict(),
            "_non_persistent_buffers_set": set(),
            "_modules": OrderedDict(model=model),
            "img_resolution": resolution,
            "img_channels": channels,
            "label_dim": label_dim,
            "use_fp16": False,
            "sigma_min": 0,
            "sigma_max": math.inf,
            "sigma_data": 0.5,
            "_init_args": (),
            "_init_kwargs": kwargs,
        },
    )
    loss = persistence.Record("EDMLoss", module_src, {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5})
    data = dict(ema=precond, loss_fn=loss, augment_pipe=None, dataset_kwargs=util.EasyDict(resolution=resolution))
    path.write_bytes(pickle.dumps(data))
    return path


@pytest.mark.parametrize("kind", ["ddpmpp", "ncsnpp"])
def test_edm_pickle_maps_exactly_onto_edm_module(kind: str, tmp_path: Path, fake_edm: Any) -> None:
    torch.manual_seed(0)
    conditional = kind == "ncsnpp"
    module = tiny_edm((3, 8, 8), class_conditional=conditional, net=lambda *a, **k: DDPMppUNet(*a, **k, **NETS[kind]))
    with torch.no_grad():  # non-trivial weights everywhere (fresh output convs are ~0)
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pkl = write_edm_pickle(tmp_path / "edm.pkl", module, fake_edm, kind)

    state, info = edm_state_dict(pkl)
    ours = module.state_dict()
    assert state.keys() == project_to_edm_state_dict(ours).keys()
    assert "model.enc.8x8_conv.weight" in state and info["model_class"] == "SongUNet"
    assert info["class_name"] == "EDMPrecond" and info["label_dim"] == (10 if conditional else 0)

    checkpoint = edm_checkpoint(pkl)
    assert checkpoint["state_dict"].keys() == ours.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in ours.items())
    net_args = checkpoint["hyper_parameters"]["net"]["init_args"]
    assert {k: net_args[k] for k in NETS[kind]} == NETS[kind]

    out = tmp_path / "edm.ckpt"
    assert convert_main([str(pkl), str(out), "--sha256", hashlib.sha256(pkl.read_bytes()).hexdigest()]) == 0
    loaded = load_lightning_module(out).eval()
    module.eval()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 12.0])
    cond = {"label": torch.tensor([3, -1])} if conditional else None
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser(x, sigma, cond), module.denoiser(x, sigma, cond), rtol=0, atol=0)


def test_module_src_is_never_executed(tmp_path: Path, fake_edm: Any) -> None:
    marker = tmp_path / "pwned"
    source = f"open({str(marker)!r}, 'w').write('ran')\n"
    module = tiny_edm((3, 8, 8), net=lambda *a, **k: DDPMppUNet(*a, **k, **NETS["ddpmpp"]))
    pkl = write_edm_pickle(tmp_path / "edm.pkl", module, fake_edm, "ddpmpp", module_src=source)
    pickle.loads(pkl.read_bytes())  # the plain unpickler runs module_src: the fixture is live
    assert marker.exists()
    marker.unlink()
    assert convert_main([str(pkl), str(tmp_path / "out.ckpt")]) == 0
    assert load_edm_pickle(pkl)["ema"].module_src == source
    assert not marker.exists()


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


class _Call:
    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


@pytest.mark.parametrize("payload", ["system", "eval", "exec", "storage"])
def test_malicious_pickle_is_refused(payload: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').write('ran')"
    evil = {
        "system": _Call(os.system, f"touch {marker}"),
        "eval": _Call(eval, code),
        "exec": _Call(exec, code),
        # a storage record whose bytes are themselves a code-running pickle: torch.load(weights_only=True) refuses it
        "storage": _Call(torch.storage._load_from_bytes, pickle.dumps(_Call(os.system, f"touch {marker}"), 2)),
    }[payload]
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"ema": evil}))
    expected = {
        "system": r"refusing to load \w+\.system from",
        "eval": "refusing to load builtins.eval from",
        "exec": "refusing to load builtins.exec from",
        "storage": "not readable .*system",
    }[payload]
    with pytest.raises(CheckpointError, match=expected):
        load_edm_pickle(pkl)
    assert convert_main([str(pkl), str(tmp_path / "out.ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(pkl) in err and "\n" not in err
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


def test_build_on_an_allowed_global_is_refused(tmp_path: Path) -> None:
    """BUILD with a state dict would setattr on the allowed rebuild function itself (state that outlives the load)."""
    from lightning_dpmot.utils import edm_pickle

    pkl = tmp_path / "build.pkl"
    pkl.write_bytes(b"ctorch._utils\n_rebuild_tensor_v2\n(dS'pwned'\nI1\nsb.")
    with pytest.raises(CheckpointError, match="refusing to load .*build.pkl: it sets the state of a function"):
        load_edm_pickle(pkl)
    assert not hasattr(edm_pickle.ALLOWED[("torch._utils", "_rebuild_tensor_v2")], "pwned")


def test_converted_checkpoint_runs_dpmot_predict(tmp_path: Path, fake_edm: Any) -> None:
    import yaml

    from lightning_dpmot.cli import main

    torch.manual_seed(0)
    module = tiny_edm((1, 8, 8), net=lambda *a, **k: DDPMppUNet(*a, **k, **NETS["ddpmpp"]))
    pkl = write_edm_pickle(tmp_path / "edm.pkl", module, fake_edm, "ddpmpp")
    assert convert_main([str(pkl), str(tmp_path / "edm.ckpt"), "--num_classes", "10"]) == 0  # digits: 10 classes
    out = tmp_path / "predictions"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning_dpmot.callbacks.SampleWriter", "init_args": {"output_dir": str(out)}}
            ],
        },
        "model": {
            "class_path": "lightning_dpmot.models.EDMModule",
            "init_args": {
                "net": {"class_path": "lightning_dpmot.nets.DDPMppUNet"},
                "sampler": {"name": "heun", "num_steps": 2},
            },
        },
        "data": {
            "class_path": "lightning_dpmot.data.DigitsDataModule",
            "init_args": {"predict_num_samples": 4, "predict_batch_size": 4},
        },
    }
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(config))
    main(["predict", "--config", str(tmp_path / "predict.yaml"), f"--ckpt_path={tmp_path / 'edm.ckpt'}"])
    import numpy as np

    with np.load(out / "samples.npz") as samples:
        images = next(iter(samples.values()))
    assert images.shape[0] == 4 and np.isfinite(images).all()


def test_sha256_mismatch_missing_key_and_non_edm_pickle(tmp_path: Path, fake_edm: Any) -> None:
    module = tiny_edm((3, 8, 8), net=lambda *a, **k: DDPMppUNet(*a, **k, **NETS["ddpmpp"]))
    pkl = write_edm_pickle(tmp_path / "edm.pkl", module, fake_edm, "ddpmpp")
    with pytest.raises(CheckpointError, match="SHA-256 .* expected " + "0" * 64):
        edm_state_dict(pkl, sha256="0" * 64)
    with pytest.raises(CheckpointError, match="no 'net' entry"):
        edm_state_dict(pkl, key="net")
    with pytest.raises(CheckpointError, match="not an EDM persistent network"):
        edm_state_dict(pkl, key="dataset_kwargs")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match="not an EDM pickle"):
        load_edm_pickle(plain)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match="not readable"):
        load_edm_pickle(garbage)


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"class_name": "VPPrecond", "model_class": "SongUNet"}, "'VPPrecond' is not supported"),
        ({"class_name": "EDMPrecond", "model_class": "DhariwalUNet"}, "'DhariwalUNet' is not supported"),
        (
            {"class_name": "EDMPrecond", "model_class": "SongUNet", "model_init_kwargs": {"decoder_type": "skip"}},
            "decoder_type 'skip' is not supported",
        ),
        ({"class_name": "EDMPrecond", "model_class": "SongUNet", "label_dim": 10, "num_classes": 5}, "label_dim=10"),
    ],
)
def test_unsupported_edm_networks_are_named(info: dict[str, Any], message: str) -> None:
    from lightning_dpmot.nets.edm_import import project_config

    num_classes = info.pop("num_classes", None)
    with pytest.raises(CheckpointError, match=message):
        project_config(info, num_classes)


def test_ddpmpp_with_edm_cifar10_settings_has_edm_parameter_count() -> None:
    net = DDPMppUNet(
        (3, 32, 32), model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], augment_dim=9
    )
    assert sum(p.numel() for p in net.parameters()) == 55_733_891
