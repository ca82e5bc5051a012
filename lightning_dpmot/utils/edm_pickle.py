"""Read NVlabs/edm network pickles (``edm-cifar10-32x32-uncond-vp.pkl`` …) without running any of EDM's code.

EDM saves ``pickle.dump(dict(ema=net, loss_fn=…, augment_pipe=…, dataset_kwargs=…), f)``; every EDM module is a
``torch_utils.persistence`` class, which pickles as ``_reconstruct_persistent_obj(meta)`` with
``meta = dict(type="class", version=6, module_src=<source of training/networks.py>, class_name=…, state=__dict__)``.
Unpickling it normally would ``exec`` ``module_src``. :class:`EDMUnpickler` instead resolves globals from an explicit
allowlist: tensor/storage rebuilders (storages are read with ``torch.load(weights_only=True)``), ``OrderedDict``,
``set``/``frozenset``, ``torch.Size``/``torch.device``/dtypes, and maps the persistence hook, ``dnnlib.util.EasyDict``
and ``torch.nn`` containers to inert stand-ins that only keep their state. Anything else is refused with a
:class:`~lightning_dpmot.utils.checkpoint_io.CheckpointError` that names the global and the file.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_dpmot.utils.checkpoint_io import CheckpointError
from lightning_dpmot.utils.hashing import file_sha256

PERSISTENCE = ("torch_utils.persistence", "_reconstruct_persistent_obj")
#: ``torch.nn`` classes EDM's networks hold directly (not persistence-wrapped); rebuilt as :class:`PlainModule`.
TORCH_CONTAINERS = frozenset({"ModuleDict", "ModuleList", "Sequential", "Identity", "SiLU", "Dropout"})
_DTYPES = ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool")


@dataclass
class PersistentObject:
    """An EDM persistence object, kept as data: its class name, the (never executed) module source and its state."""

    class_name: str
    module_src: str
    version: int
    state: dict[str, Any] = field(default_factory=dict)


class PlainModule:
    """Inert stand-in for a ``torch.nn`` container: NEWOBJ creates it, BUILD stores the module's ``__dict__``."""

    class_name = "Module"

    def __init__(self, *args: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, dict) else {}


class EasyDict(dict):
    """Inert stand-in for ``dnnlib.util.EasyDict``: a plain ``dict`` subclass (no attribute magic)."""

    def __setstate__(self, state: Any) -> None:  # an EasyDict's empty __dict__; nothing to keep
        return None


def _plain_module_class(name: str) -> type[PlainModule]:
    return type(name, (PlainModule,), {"class_name": name})


_PLAIN_MODULES = {name: _plain_module_class(name) for name in TORCH_CONTAINERS}


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps ``meta`` as data, runs nothing."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("malformed torch_utils.persistence record (need type='class' and a class_name)")
    state = meta.get("state")
    return PersistentObject(
        class_name=meta["class_name"],
        module_src=str(meta.get("module_src", "")),
        version=int(meta.get("version", 0)),
        state=dict(state) if isinstance(state, dict) else {},
    )


def _load_storage(data: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes``: the same bytes, read with ``weights_only=True``."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("storage record is not bytes")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (every failure is one refusal)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "global" in line.lower()), lines[0] if lines else type(err).__name__)
        raise pickle.UnpicklingError(
            f"a tensor storage was refused by torch.load(weights_only=True): {detail}"
        ) from err


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: the tensor view only (no hooks, no requires_grad)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"tensor record has a {type(storage).__name__} where a storage belongs")
    return torch._utils._rebuild_tensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_parameter(_with_state)``: the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter record does not hold a tensor")
    return data


ALLOWED: dict[tuple[str, str], Any] = {
    PERSISTENCE: _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    **{("torch", name): getattr(torch, name) for name in _DTYPES},
    **{("torch.nn.modules.container", name): cls for name, cls in _PLAIN_MODULES.items()},
    **{
        (f"torch.nn.modules.{mod}", name): _PLAIN_MODULES[name]
        for mod, name in (("linear", "Identity"), ("activation", "SiLU"), ("dropout", "Dropout"))
    },
}


class EDMUnpickler(pickle._Unpickler):  # the Python implementation: its BUILD opcode can be restricted
    """Unpickler that resolves only :data:`ALLOWED` globals and BUILDs only the inert stand-ins (no ``setattr`` on
    an allowed function or class); ``label`` names the file in errors."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, label: str) -> None:
        super().__init__(file)
        self.label = label

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(target, (PlainModule, EasyDict)):
            raise CheckpointError(
                f"refusing to load {self.label}: it sets the state of a {type(target).__name__} (only torch.nn "
                "containers and EasyDicts take a state in an EDM network pickle)"
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load {module}.{name} from {self.label}: not a tensor, container or EDM persistence "
                "record (an EDM network pickle holds nothing else; loading it could run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"refusing to load {self.label}: persistent ids are not part of an EDM network pickle")


def load_edm_pickle(path: str | os.PathLike[str], sha256: str | None = None) -> dict[str, Any]:
    """The top-level dictionary of an EDM pickle, its networks as :class:`PersistentObject` trees; no code runs.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: SHA-256 mismatch, a refused global, or a file that is not an EDM network pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EDM pickle not found: {path}")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual.lower() != sha256.strip().lower():
            raise CheckpointError(f"EDM pickle {path} has SHA-256 {actual}, expected {sha256.strip().lower()}")
    try:
        with path.open("rb") as f:
            data = EDMUnpickler(f, str(path)).load()
    except CheckpointError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RuntimeError,
    ) as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"EDM pickle {path} is not readable ({type(err).__name__}: {detail})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not an EDM pickle's dictionary")
    return data


def _flatten(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Append the parameters and persistent buffers of a module tree (``state`` dicts) under ``prefix``."""
    state = node.state if isinstance(node, (PersistentObject, PlainModule)) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"module {prefix.rstrip('.') or '<root>'} has no module state")
    skip = state.get("_non_persistent_buffers_set") or set()
    for section in ("_parameters", "_buffers"):
        for name, tensor in (state.get(section) or {}).items():
            if tensor is None or (section == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _flatten(child, f"{prefix}{name}.", out)


def _plain(value: Any) -> Any:
    """EasyDicts, tuples and OrderedDicts as plain dicts/lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def edm_state_dict(
    path: str | os.PathLike[str], key: str = "ema", sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """EDM's flat state dict (``model.enc.32x32_conv.weight`` …) of network ``key`` and a description of it.

    ``info`` holds ``class_name`` (e.g. EDMPrecond), ``model_class`` (SongUNet), ``init_kwargs`` of both, and the
    precond's attributes ``img_resolution``, ``img_channels``, ``label_dim``, ``sigma_data``, ``sigma_min``,
    ``sigma_max``, ``use_fp16`` when present.
    """
    data = load_edm_pickle(path, sha256)
    if key not in data:
        raise CheckpointError(f"EDM pickle {path} has no {key!r} entry (entries: {', '.join(map(str, data))})")
    net = data[key]
    if not isinstance(net, PersistentObject):
        raise CheckpointError(f"entry {key!r} of {path} is a {type(net).__name__}, not an EDM persistent network")
    state: dict[str, torch.Tensor] = {}
    _flatten(net, "", state)
    model = (net.state.get("_modules") or {}).get("model")
    attrs = ("img_resolution", "img_channels", "label_dim", "sigma_data", "sigma_min", "sigma_max", "use_fp16")
    info: dict[str, Any] = {
        "class_name": net.class_name,
        "init_kwargs": _plain(net.state.get("_init_kwargs") or {}),
        "model_class": model.class_name if isinstance(model, PersistentObject) else None,
        "model_init_kwargs": _plain(model.state.get("_init_kwargs") or {})
        if isinstance(model, PersistentObject)
        else {},
        **{name: _plain(net.state[name]) for name in attrs if name in net.state},
    }
    return state, info
