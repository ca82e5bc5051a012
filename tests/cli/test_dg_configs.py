"""configs/dg/digits_disc.yaml -> configs/eval/dg_sweep.yaml end to end: dpmot fit trains a discriminator on predict
fakes, dpmot test runs the NFE sweep with every sampler call discriminator-guided (fast_dev_run skips the sweep, so
this runs it with fewer samples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_dpmot.cli import main
from lightning_dpmot.diffusion import discriminator_guidance
from lightning_dpmot.diffusion.discriminator_guidance import DGDenoiser

REPO = Path(__file__).resolve().parents[2]


def test_disc_fit_then_guided_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.savez(tmp_path / "samples.npz", x=x.numpy())
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/dg/digits_disc.yaml"),
            f"--model.init_args.fake={tmp_path / 'samples.npz'}",
            "--model.init_args.noise_coupling=ot",
            "--trainer.max_steps=3",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'disc'}",
        ]
    )
    ckpt = tmp_path / "disc" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    sweep = yaml.safe_load((REPO / "configs/eval/dg_sweep.yaml").read_text())
    callback = sweep["trainer"]["callbacks"][0]["init_args"]
    assert callback["samplers"] == ["unipc"] and callback["nfe"] == [5, 7, 10]
    callback.update(nfe=[5], num_samples=16, batch_size=16, precision_recall=False, copy_threshold=0.0)
    callback["output_dir"] = str(tmp_path / "sweep")
    sweep["model"]["init_args"]["guidance"]["discriminator"]["checkpoint"] = str(ckpt)
    small = tmp_path / "dg_sweep.yaml"
    small.write_text(yaml.safe_dump(sweep))
    calls: list[int] = []
    original = DGDenoiser.__call__

    def counting(self: DGDenoiser, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DGDenoiser, "__call__", counting)
    discriminator_guidance._LOADED.clear()
    main(
        [
            "test",
            "--config",
            str(REPO / "configs/quickstart.yaml"),
            "--config",
            str(small),
            "--trainer.limit_test_batches=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'eval'}",
        ]
    )
    rows = (tmp_path / "sweep" / "fid_vs_nfe.csv").read_text().splitlines()
    assert rows[1].startswith("unipc,karras,7.0,5,5,")
    assert len(calls) == 5  # one guided denoiser call per NFE, 16 samples in one batch
