"""``python -m lightning_dpmot.convert_edm edm.pkl out.ckpt [--sha256 HEX] [--key ema]``.

Converts an NVlabs/edm network pickle (DDPM++/NCSN++ ``EDMPrecond``) into a Lightning checkpoint for
``dpmot predict/test --ckpt_path out.ckpt``, without running any code from the pickle (see
:mod:`lightning_dpmot.utils.edm_pickle`). The checkpoint is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_dpmot.nets.edm_import import edm_checkpoint
from lightning_dpmot.utils.checkpoint_io import CheckpointError, atomic_save


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; returns the exit status (0 ok, 1 a one-line error on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_dpmot.convert_edm",
        description="Convert an NVlabs/edm network pickle into a dpmot checkpoint (no code from the pickle runs).",
    )
    parser.add_argument("pickle", help="EDM network pickle, e.g. edm-cifar10-32x32-uncond-vp.pkl")
    parser.add_argument("output", help="Lightning checkpoint to write")
    parser.add_argument("--sha256", default=None, help="expected SHA-256 of the pickle (hex)")
    parser.add_argument("--key", default="ema", help="entry of the pickle holding the network (default: ema)")
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="classes of the dataset the checkpoint is used with (default: the net's label_dim; give 10 for an "
        "unconditional CIFAR-10 net used with CIFAR10DataModule)",
    )
    args = parser.parse_args(argv)
    try:
        checkpoint = edm_checkpoint(args.pickle, args.key, args.sha256, args.num_classes)
        atomic_save(checkpoint, args.output)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    hp = checkpoint["hyper_parameters"]
    count = sum(t.numel() for k, t in checkpoint["state_dict"].items() if not k.endswith("resample_filter"))
    print(
        f"wrote {args.output}: EDMModule + DDPMppUNet ({hp['net']['init_args']['embedding_type']}), "
        f"data_shape {tuple(hp['data_shape'])}, {hp['num_classes']} classes, {count:,} parameters"
    )
    if not hp["class_conditional"] and not hp["num_classes"]:
        print("note: an unconditional net used with a labelled data module needs --num_classes (CIFAR-10: 10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
