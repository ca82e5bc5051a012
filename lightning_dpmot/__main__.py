"""``python -m lightning_dpmot fit --config ...`` (same as the ``dpmot`` console script)."""

from lightning_dpmot.cli import console_main

if __name__ == "__main__":
    console_main()
