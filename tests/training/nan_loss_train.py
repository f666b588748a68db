"""Runs `megafusion train` with the objective's loss replaced by NaN on the micro-steps listed in
MEGAFUSION_TEST_NAN_CALLS ("all" or comma-separated 0-based call numbers). Used by test_trainer."""

import os
import sys

import torch

from megafusion.cli import main
from megafusion.training.objective import TransfusionObjective

SPEC = os.environ["MEGAFUSION_TEST_NAN_CALLS"]
CALLS = None if SPEC == "all" else {int(x) for x in SPEC.split(",")}
_original = TransfusionObjective.__call__
_count = 0


def poisoned(self, *args, **kwargs):
    global _count
    out = _original(self, *args, **kwargs)
    if CALLS is None or _count in CALLS:
        out.loss = out.loss * torch.tensor(float("nan"))
    _count += 1
    return out


TransfusionObjective.__call__ = poisoned
sys.exit(main(sys.argv[1:]))
