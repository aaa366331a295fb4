"""Sharded fits (2 gloo processes, FSDP2 via ModelParallelStrategy); rank zero saves what they computed.

    python -m tests.fsdp.fits OUT STRATEGY CASE [CASE ...]

STRATEGY: ``fsdp`` (ModelParallelStrategy) or ``ddp`` (the reference for quantization-aware training, whose first
activation range is each process's own); CASE: a name of ``tests.fsdp.common.CASES``, ``resume``,
``resume_full`` (one-file checkpoints), ``export``, ``unsynced``, ``channel``, ``channel_taylor``, ``channel_gpt2``,
``channel_qat`` or ``dead``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from tests.fsdp.common import run_case, run_channel, run_export, run_resume, run_unsynced


def main() -> None:
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    results = {}
    for case in sys.argv[3:]:
        began = time.perf_counter()
        root = out / case
        special = {"resume": run_resume, "export": run_export, "unsynced": run_unsynced, "channel": run_channel,
                   "resume_full": lambda n, r: run_resume(n, r, "fsdp_full"),
                   "dead": lambda n, r: run_channel(n, r, dead=True),
                   "channel_taylor": lambda n, r: run_channel(n, r, importance="taylor"),
                   "channel_gpt2": lambda n, r: run_channel(n, r, gpt=True),
                   "channel_qat": lambda n, r: run_channel(n, r, quantized=True)}
        results[case] = special[case](2, root) if case in special else run_case(case, 2, root, strategy)
        results[case]["seconds"] = time.perf_counter() - began
        if torch.distributed.get_rank() == 0:
            torch.save(results, out / f"{strategy}.pt")


if __name__ == "__main__":
    main()
