"""Runs `megafusion train` but dies (os._exit) in the middle of writing the checkpoint of step CRASH_STEP: after
DeepSpeed wrote its files and before the checkpoint is marked complete. Used by test_trainer."""

import os
import sys

from megafusion.cli import main
from megafusion.training.run_checkpoints import CheckpointManager

CRASH_STEP = int(os.environ["MEGAFUSION_TEST_CRASH_STEP"])
_save_checkpoint = None


def crashing_save(self, engine, step, loader, generator, extra):
    if step != CRASH_STEP:
        return original(self, engine, step, loader, generator, extra)
    engine.save_checkpoint(str(self.dir), tag=self.tag(step), client_state={}, save_latest=False,
                           exclude_frozen_parameters=True)
    os._exit(17)


original = CheckpointManager.save
CheckpointManager.save = crashing_save
sys.exit(main(sys.argv[1:]))
