"""``dpmot fit`` killed with SIGKILL mid-epoch and resumed from its mid-epoch ``last.ckpt`` ends with the weights of
the uninterrupted run, bit for bit (slow: three subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

STALL_CALLBACK = '''
import os
import time

import lightning as L


class StallOnce(L.Callback):
    """Writes ``marker`` and sleeps at the end of step ``at_step``, unless ``marker`` exists (the resumed run)."""

    def __init__(self, at_step: int, marker: str) -> None:
        self.at_step, self.marker = at_step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(600)
'''

STEPS, SAVE_EVERY, KILL_AT = 14, 5, 7  # digits at batch 128: 11 steps per epoch; last.ckpt of step 5 (mid-epoch)


def _write_config(root: Path, marker: Path) -> Path:
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": STEPS,
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "lightning_dpmot.callbacks.LastCheckpoint",
                    "init_args": {
                        "dirpath": str(root),
                        "save_last": True,
                        "save_top_k": 0,
                        "every_n_train_steps": SAVE_EVERY,
                    },
                },
                {"class_path": "stall_callback.StallOnce", "init_args": {"at_step": KILL_AT, "marker": str(marker)}},
            ],
        },
        "model": {
            "class_path": "lightning_dpmot.models.EDMModule",
            "init_args": {
                "net": {
                    "class_path": "lightning_dpmot.nets.DDPMppUNet",
                    "init_args": {
                        "model_channels": 8,
                        "channel_mult": [1, 1],
                        "num_blocks": 1,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                },
            },
        },
        "data": {"class_path": "lightning_dpmot.data.DigitsDataModule", "init_args": {"batch_size": 128}},
    }
    root.mkdir(parents=True)
    path = root.parent / f"{root.name}.yaml"  # not in the run folder, where the CLI saves its config.yaml
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, support: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(support), os.environ.get("PYTHONPATH", "")]))
    env |= {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "lightning_dpmot", "fit", "--config", str(config), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == STEPS
    return state["state_dict"]


@pytest.mark.slow
def test_kill_mid_epoch_and_resume_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    support = tmp_path / "support"
    support.mkdir()
    (support / "stall_callback.py").write_text(STALL_CALLBACK)
    done_marker = tmp_path / "never-stall"
    done_marker.touch()
    marker = tmp_path / "stalled"
    reference = _fit(_write_config(tmp_path / "reference", done_marker), support)
    config = _write_config(tmp_path / "killed", marker)
    killed = _fit(config, support)
    deadline = time.monotonic() + 240
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), (killed.poll(), killed.stdout.read().decode()[-3000:] if killed.poll() is not None else "")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    last = tmp_path / "killed" / "last.ckpt"
    saved = torch.load(last, weights_only=True, map_location="cpu")
    assert saved["global_step"] == SAVE_EVERY  # killed at step 7 of 14: the run left step 5's checkpoint
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": 0, "position": SAVE_EVERY, "batch_size": 128, "num_replicas": 1}]

    resumed_root = f"--trainer.default_root_dir={tmp_path / 'resumed'}"  # a fresh log folder; last.ckpt stays put
    _finish(_fit(config, support, "--ckpt_path", str(last), resumed_root))
    _finish(reference)
    expected, got = _weights(tmp_path / "reference" / "last.ckpt"), _weights(last)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"
