from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_dpmot.metrics.inception import (
    WEIGHTS_ENV_VAR,
    WEIGHTS_FILENAME,
    WEIGHTS_SHA256,
    InceptionV3Features,
    resize_bilinear_tf1,
    resolve_inception_weights,
)

# Layout of torch-fidelity's weights-inception-2015-12-05-6726825d.pth, read off its converter
# (utils/util_convert_inception_weights.py): 94 conv+batchnorm units with 5 tensors each
# (conv.weight, bn.weight/bias/running_mean/running_var, no num_batches_tracked) plus fc.weight/bias.
_BRANCHES = {
    "A": [
        "branch1x1",
        "branch5x5_1",
        "branch5x5_2",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3",
        "branch_pool",
    ],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": [
        "branch1x1",
        "branch7x7_1",
        "branch7x7_2",
        "branch7x7_3",
        *[f"branch7x7dbl_{i}" for i in range(1, 6)],
        "branch_pool",
    ],
    "D": ["branch3x3_1", "branch3x3_2", *[f"branch7x7x3_{i}" for i in range(1, 5)]],
    "E": [
        "branch1x1",
        "branch3x3_1",
        "branch3x3_2a",
        "branch3x3_2b",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3a",
        "branch3x3dbl_3b",
        "branch_pool",
    ],
}
_BLOCKS = {
    "Mixed_5b": "A",
    "Mixed_5c": "A",
    "Mixed_5d": "A",
    "Mixed_6a": "B",
    "Mixed_6b": "C",
    "Mixed_6c": "C",
    "Mixed_6d": "C",
    "Mixed_6e": "C",
    "Mixed_7a": "D",
    "Mixed_7b": "E",
    "Mixed_7c": "E",
}
_STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.running_var": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# Keras' InceptionV3 (same graph, no BN scale, 1000 classes) has 23,851,784 numbers = conv weights
# + 3 * 17,216 BN channels + 2049 * 1000; with a BN scale and 1008 classes that is 23,885,392.
_N_CONV_WEIGHTS, _N_BN_CHANNELS = 21_751_136, 17_216


def _expected_keys() -> set[str]:
    units = _STEM + [f"{block}.{b}" for block, kind in _BLOCKS.items() for b in _BRANCHES[kind]]
    suffixes = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    return {f"{u}.{s}" for u in units for s in suffixes} | {"fc.weight", "fc.bias"}


def test_state_dict_matches_torch_fidelity_layout() -> None:
    state = InceptionV3Features(pretrained=False).state_dict()
    assert set(state) == _expected_keys()
    assert len(state) == 94 * 5 + 2 == 472
    for key, shape in _SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(v.numel() for k, v in state.items() if k.endswith("conv.weight")) == _N_CONV_WEIGHTS
    assert sum(v.numel() for k, v in state.items() if k.endswith("bn.weight")) == _N_BN_CHANNELS
    assert _N_CONV_WEIGHTS + 3 * _N_BN_CHANNELS + 2049 * 1000 == 23_851_784
    assert sum(v.numel() for v in state.values()) == 23_885_392


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    return tmp_path


def test_missing_weights_error_names_file_and_paths(no_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(no_weights / "elsewhere.pth"))
    with pytest.raises(FileNotFoundError) as info:
        InceptionV3Features()
    msg = str(info.value)
    assert WEIGHTS_FILENAME in msg
    assert str(no_weights / "elsewhere.pth") in msg
    assert str(no_weights / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILENAME) in msg
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" in msg
    with pytest.raises(FileNotFoundError, match="weights_path argument"):
        InceptionV3Features(weights_path=no_weights / "typo.pth")


def test_resolution_order(no_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = no_weights / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / WEIGHTS_FILENAME).write_bytes(b"hub")
    assert resolve_inception_weights() == hub / WEIGHTS_FILENAME
    env_dir = no_weights / "env"
    env_dir.mkdir()
    (env_dir / WEIGHTS_FILENAME).write_bytes(b"env")
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(env_dir))  # a directory holding the file
    assert resolve_inception_weights() == env_dir / WEIGHTS_FILENAME
    explicit = no_weights / "mine.pth"
    explicit.write_bytes(b"explicit")
    assert resolve_inception_weights(explicit) == explicit


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Random, well-scaled tensors in the weight file's layout, saved as a plain state dict."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, v in InceptionV3Features(pretrained=False).state_dict().items():
        noise = torch.randn(v.shape, generator=gen)
        if key.endswith("conv.weight"):
            state[key] = noise * (2.0 / v[0].numel()) ** 0.5
        elif key.endswith("running_var"):
            state[key] = torch.rand(v.shape, generator=gen) + 0.5
        elif key.endswith("bn.weight"):
            state[key] = 1.0 + 0.1 * noise
        else:
            state[key] = 0.1 * noise
    path = tmp_path_factory.mktemp("weights") / WEIGHTS_FILENAME
    torch.save(state, path)
    return path, state


def test_fake_weights_round_trip(fake_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = fake_weights
    model = InceptionV3Features(weights_path=path, verify_hash=False)
    assert model.num_features == 2048 and model.name == "inception-2015-12-05"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = model(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and (f >= 0).all()  # means of ReLU outputs
    assert (f[0] - f[1]).abs().max() > 1e-3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # stays float32 inside; per-image
        f0 = model(x[:1])
    torch.testing.assert_close(f0, f[:1], rtol=1e-4, atol=1e-5)
    logits = model.logits(f)
    torch.testing.assert_close(logits, f @ state["fc.weight"].T)


def test_hash_is_verified(fake_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = fake_weights
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"sha256 of .* is {digest}, expected {WEIGHTS_SHA256} "):
        InceptionV3Features(weights_path=path)


def test_wrong_layout_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not match the FID Inception layout: missing keys"):
        InceptionV3Features(weights_path=path, verify_hash=False)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        InceptionV3Features(weights_path=path, verify_hash=False)


def _tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF 1.x resize_bilinear (align_corners=False) from its kernel: in = out * (in_size / out_size)."""
    in_h, in_w = img.shape
    out = np.empty((out_h, out_w))
    sy, sx = np.float32(in_h / out_h), np.float32(in_w / out_w)
    for i in range(out_h):
        y = np.float32(i) * sy
        y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), in_h - 1)
        for j in range(out_w):
            x = np.float32(j) * sx
            x0, x1 = int(np.floor(x)), min(int(np.ceil(x)), in_w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * (x - x0)
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * (x - x0)
            out[i, j] = top + (bottom - top) * (y - y0)
    return out


@pytest.mark.parametrize(("in_hw", "out_hw"), [((5, 7), (13, 11)), ((9, 6), (4, 3)), ((32, 32), (299, 299))])
def test_resize_matches_tf1_reference(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    img = np.random.default_rng(0).uniform(0, 255, size=in_hw)
    ours = resize_bilinear_tf1(torch.from_numpy(img)[None, None], out_hw)[0, 0].numpy()
    np.testing.assert_allclose(ours, _tf1_resize_reference(img, *out_hw), rtol=1e-12, atol=1e-9)


def test_resize_hand_example_and_identity() -> None:
    x = torch.tensor([[[[0.0, 4.0]]]])  # 1x2 -> 1x4: samples at 0, 0.5, 1, 1.5 (border repeats)
    torch.testing.assert_close(resize_bilinear_tf1(x, (1, 4)), torch.tensor([[[[0.0, 2.0, 4.0, 4.0]]]]))
    y = torch.rand(2, 3, 6, 5)
    assert torch.equal(resize_bilinear_tf1(y, (6, 5)), y)
    with pytest.raises(ValueError, match=r"float tensor of shape \(B, C, H, W\)"):
        resize_bilinear_tf1(torch.zeros(3, 4, 4), (2, 2))


def test_input_conversion() -> None:
    model = InceptionV3Features(pretrained=False)
    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    as_float = u8.float() / 255.0 + 1e-3  # off-grid floats round to the 8-bit level
    assert torch.equal(model._to_pixels(as_float), u8.float())
    assert torch.equal(model._to_pixels(u8), u8.float())
    gray = model._to_pixels(u8[:, :1].float() / 255.0)
    assert gray.shape == (2, 3, 4, 4) and torch.equal(gray, u8[:, :1].float().expand(-1, 3, -1, -1))
    exact = InceptionV3Features(pretrained=False, quantize=False)
    assert exact.name != model.name
    torch.testing.assert_close(exact._to_pixels(torch.full((1, 3, 2, 2), 0.5)), torch.full((1, 3, 2, 2), 127.5))
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\)"):
        model(torch.rand(1, 2, 8, 8))
