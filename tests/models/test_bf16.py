"""``precision="bf16-mixed"`` on CPU for every LightningModule, and the float32 islands inside bf16 autocast.

Each diffusion / matching module trains a few steps under Lightning's CPU bf16 autocast: the loss is finite and
float32, parameters (and EMA's copy) stay float32, and the first step's loss is within bf16 tolerance of the
float32 run on the same batch, noise and initial weights (measured: relative differences 2e-4 .. 6e-4). The OT
parts (costs, assignments, the semi-discrete solver and maps) and the samplers' ODE state do not run in bf16: their
results under autocast equal the float32 ones exactly (OT) or to the network's bf16 rounding (samplers).
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, tiny_edm, tiny_edm_checkpoint, tiny_unet
from torch import Tensor, nn

from lightning_dpmot.callbacks import EMAHalfLife
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.diffusion import EDMPrecond
from lightning_dpmot.diffusion.edm import edm_precond
from lightning_dpmot.models import DPMModule
from lightning_dpmot.models.matching import contrastive_loss
from lightning_dpmot.ot.assignment import solve_assignment
from lightning_dpmot.ot.costs import inner_product_cost, pairwise_cost
from lightning_dpmot.sampling import SamplerSpec
from lightning_dpmot.sampling.spec import run_sampler

REPO = Path(__file__).resolve().parents[2]
REL_TOL = 2e-2  # bf16 keeps 8 mantissa bits (~4e-3 relative per op)


def bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


class LossRecorder(L.Callback):
    """Records each step's returned loss and the dtypes of all parameters after the step."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.param_dtypes: set[torch.dtype] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # None under manual optimisation (SemiDiscreteOTModule)
            self.losses.append(loss.detach().clone())
        self.param_dtypes |= {p.dtype for p in pl_module.parameters()}


def perturbed(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Move the zero-initialised output layers so that the network's output (and its bf16 rounding) matters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def fit(
    model: L.LightningModule, dm: L.LightningDataModule, precision: str, root: Path, **kwargs: object
) -> LossRecorder:
    recorder = LossRecorder()
    callbacks = [recorder, *kwargs.pop("callbacks", [])]  # type: ignore[misc]
    L.seed_everything(0)
    trainer = quiet_trainer(
        root / precision,
        devices=1,
        max_steps=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        precision=precision,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, dm)
    return recorder


def check_bf16_training(model: L.LightningModule, make_dm, root: Path, **kwargs: object) -> tuple[float, float]:
    """Train copies of ``model`` under fp32 and bf16-mixed; returns the first-step losses (fp32, bf16)."""
    ref = fit(copy.deepcopy(model), make_dm(), "32-true", root, **kwargs)
    bf16_model = copy.deepcopy(model)
    run = fit(bf16_model, make_dm(), "bf16-mixed", root, **kwargs)
    assert len(run.losses) == 3
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in run.losses)
    assert run.param_dtypes == {torch.float32}
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())
    a, b = float(ref.losses[0]), float(run.losses[0])
    assert a != b, "the bf16 run computed exactly the float32 loss: autocast did not reach the network"
    assert abs(a - b) <= REL_TOL * abs(a), (a, b)
    return a, b


def test_edm_trains_under_bf16_mixed_with_fp32_ema(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturbed(tiny_edm(class_conditional=True, label_dropout=0.1))
    ema = EMAHalfLife(halflife_images=64, rampup_ratio=None)
    check_bf16_training(model, lambda: DigitsDataModule(batch_size=16), tmp_path, callbacks=[ema])
    averaged = ema._average_model  # Lightning's WeightAveraging keeps the averaged copy here
    assert averaged is not None and {p.dtype for p in averaged.parameters()} == {torch.float32}


def test_dpm_trains_under_bf16_mixed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturbed(DPMModule(tiny_unet(), data_shape=(1, 8, 8), num_classes=10, class_conditional=True))
    check_bf16_training(model, lambda: DigitsDataModule(batch_size=16), tmp_path)


def shapes_dm():
    from lightning_dpmot.data import ShapesCaptionsDataModule

    return ShapesCaptionsDataModule(resolution=16, num_train=48, num_val=16, batch_size=16, num_workers=0)


def test_text2img_trains_under_bf16_mixed(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from conftest import tiny_text2img

    torch.manual_seed(0)
    check_bf16_training(perturbed(tiny_text2img((3, 16, 16))), shapes_dm, tmp_path)


def test_contrastive_matching_trains_under_bf16_mixed(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from lightning_dpmot.models import ContrastiveMatchingModule

    tiny = dict(width=32, layers=1, heads=2, embed_dim=16, text_width=32, text_layers=1, max_length=48)
    check_bf16_training(ContrastiveMatchingModule(**tiny, data_shape=(3, 16, 16)), shapes_dm, tmp_path)


def test_semidiscrete_fit_under_bf16_mixed_equals_the_fp32_fit_exactly(tmp_path: Path) -> None:
    from lightning_dpmot.models.semidiscrete import SemiDiscreteOTModule
    from lightning_dpmot.ot.semidiscrete import SemiDiscreteConfig

    solvers = []
    for precision in ("32-true", "bf16-mixed"):
        config = SemiDiscreteConfig(num_mc_samples=1024, chunk_size=256)
        module = SemiDiscreteOTModule(sigma_s=0.5, max_targets=32, seed=3, solver=config)
        fit(module, DigitsDataModule(batch_size=128), precision, tmp_path)
        solvers.append(module.solver)
    ref, bf16 = solvers
    assert bf16.h.dtype == ref.h.dtype and int(bf16.iteration) == 3
    assert torch.equal(bf16.h, ref.h)


# ------------------------------------------------------------------------------------- float32 islands in autocast
def test_ot_costs_and_assignments_ignore_autocast() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 4, 4, generator=gen), torch.randn(24, 3, 4, 4, generator=gen)
    with bf16_autocast():
        unprotected = x.flatten(1) @ y.flatten(1).T
        costs = {name: pairwise_cost(x, y, name) for name in ("l2", "sqeuclidean")}
        inner = inner_product_cost(x, y)
        perms = {m: solve_assignment(costs["l2"], m) for m in ("exact", "sinkhorn", "auction")}
    assert unprotected.dtype == torch.bfloat16  # autocast is active in this block
    for name, cost in costs.items():
        assert cost.dtype == torch.float32 and torch.equal(cost, pairwise_cost(x, y, name))
    assert inner.dtype == torch.float32 and torch.equal(inner, inner_product_cost(x, y))
    for method, perm in perms.items():
        assert torch.equal(perm, solve_assignment(pairwise_cost(x, y), method)), method


def test_contrastive_loss_is_fp32_under_autocast() -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=1)
    texts = [f"caption {i % 5}" for i in range(8)]
    scale = torch.tensor(14.3)
    with bf16_autocast():
        loss = contrastive_loss(img, txt, scale, texts)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, contrastive_loss(img, txt, scale, texts))


class ConvNet(nn.Module):
    """A raw net with one conv (runs in bf16 under autocast), times c_noise; records the conv's output dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.out_dtypes: list[torch.dtype] = []

    def forward(self, x: Tensor, noise_labels: Tensor, cond: object = None) -> Tensor:
        h = self.conv(x)
        self.out_dtypes.append(h.dtype)
        return h * noise_labels.reshape(-1, 1, 1, 1).to(h.dtype)


def test_edm_denoiser_runs_the_net_in_bf16_and_combines_in_fp32() -> None:
    torch.manual_seed(0)
    net = ConvNet()
    denoiser = EDMPrecond(net)
    x, sigma = torch.randn(4, 1, 8, 8) * 2, torch.tensor([0.01, 0.5, 2.0, 80.0])
    with bf16_autocast():
        D_x = denoiser(x, sigma)
    assert net.out_dtypes == [torch.bfloat16] and D_x.dtype == torch.float32  # bf16 net, fp32 denoiser
    c = edm_precond(sigma)  # the combination in fp32 from the bf16 net output
    with bf16_autocast():
        F_x = net(c.c_in.reshape(-1, 1, 1, 1) * x, c.c_noise).float()
    expected = c.c_skip.reshape(-1, 1, 1, 1) * x + c.c_out.reshape(-1, 1, 1, 1) * F_x
    torch.testing.assert_close(D_x, expected, rtol=1e-6, atol=1e-6)
    # the skip path c_skip x is not rounded to bf16 (8 mantissa bits would move it by up to ~4e-3 relative)
    skip = c.c_skip.reshape(-1, 1, 1, 1) * x
    assert not torch.equal(skip, skip.bfloat16().float())
    torch.testing.assert_close(D_x - c.c_out.reshape(-1, 1, 1, 1) * F_x, skip, rtol=1e-6, atol=1e-6)


def test_sampler_state_stays_fp64_under_autocast_and_matches_fp32() -> None:
    torch.manual_seed(0)
    model = perturbed(tiny_edm(num_classes=0)).eval()
    sigmas = model.sigmas_for(SamplerSpec("heun", num_steps=4))
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)).double() * sigmas[0]
    states: list[torch.dtype] = []

    def record(info: dict) -> None:
        states.append(info["x"].dtype)

    with torch.no_grad():
        ref = run_sampler(SamplerSpec("heun", num_steps=4), model.denoiser, x0, sigmas).x
        with bf16_autocast():
            out = run_sampler(SamplerSpec("heun", num_steps=4), model.denoiser, x0, sigmas, callback=record).x
            generated = model.generate([0, 1], spec=SamplerSpec("euler", num_steps=3)).x
    assert out.dtype == torch.float64 and states == [torch.float64] * 4
    assert not torch.equal(out, ref)  # the net did run in bf16
    assert (out - ref).abs().max() <= REL_TOL * ref.abs().max()
    assert generated.dtype == torch.float32


# --------------------------------------------------------------------------------------------- DPM-OT expressway
def test_dpm_ot_predict_under_bf16_mixed_maps_like_fp32(tmp_path: Path) -> None:
    from lightning_dpmot.cli import main
    from lightning_dpmot.models.dpm_ot import DPMOTModule

    edm = tiny_edm_checkpoint(tmp_path / "edm", class_conditional=True)
    ot_root = tmp_path / "ot"
    args = ["--model.init_args.max_targets=64", "--model.init_args.solver.num_mc_samples=2048"]
    config = str(REPO / "configs/dpm_ot/digits_fit.yaml")
    main(
        [
            "fit",
            "--config",
            config,
            *args,
            "--trainer.max_steps=3",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={ot_root}",
        ]
    )
    outputs = {}
    for precision in ("32-true", "bf16-mixed"):
        module = DPMOTModule(str(edm), str(ot_root / "checkpoints" / "last.ckpt"), sampler=SamplerSpec("heun", 3))
        dm = DigitsDataModule(predict_num_samples=6, predict_batch_size=6)
        trainer = quiet_trainer(tmp_path / precision, devices=1, precision=precision)
        outputs[precision] = trainer.predict(module, dm)[0]
    ref, bf16 = outputs["32-true"], outputs["bf16-mixed"]
    assert bf16["x"].dtype == torch.float32
    assert torch.equal(bf16["target_index"], ref["target_index"])  # the OT map ran in exact fp32
    assert not torch.equal(bf16["x"], ref["x"]) and (bf16["x"] - ref["x"]).abs().max() < 0.05
