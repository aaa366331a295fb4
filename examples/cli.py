"""Every litcompress callback and `DistillationModule` option from YAML, with Lightning's own `LightningCLI`.

    python examples/cli.py fit --config examples/configs/prune.yaml      # prune a student CNN
    python examples/cli.py fit --config examples/configs/qat.yaml        # quantization-aware training
    python examples/cli.py fit --config examples/configs/distill.yaml    # distil from the pipeline's teacher
    python examples/cli.py fit --config examples/configs/all.yaml        # all three in one fit, with the report
    python examples/cli.py fit --config examples/configs/all.yaml --print_config   # every option, resolved

The distillation configs load the teacher that `python examples/mnist_pipeline.py` saves
(`mnist_pipeline_out/teacher.pt`); override it with `--model.init_args.teacher.init_args.weights=PATH`.
Classes are named by import path (`class_path`/`init_args`): `mnist5k.*` from this folder, `litcompress.*`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `mnist5k` class paths resolve from any directory

from mnist5k import MNIST5k


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(datamodule_class=MNIST5k, subclass_mode_model=True, args=args,
                        save_config_kwargs={"overwrite": True})


def _missing_file(err: BaseException | None) -> FileNotFoundError | None:
    """The FileNotFoundError behind an error (jsonargparse wraps what a class raises while it is built)."""
    while err is not None and not isinstance(err, FileNotFoundError):
        err = err.__cause__ or err.__context__
    return err


if __name__ == "__main__":
    try:
        main()
    except Exception as err:
        missing = _missing_file(err)
        if missing is None:
            raise
        sys.exit(f"error: {missing}")  # e.g. the teacher's weights: one clear line, not a 110-line traceback
