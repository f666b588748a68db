"""The preemption guard acts at a step boundary only: a signal is noted, the step finishes, then one checkpoint
and the requeue exit code."""

import os
import signal

import pytest

from megafusion.training.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionGuard


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_is_acted_on_at_the_next_step_end(sig):
    saved = []
    guard = PreemptionGuard(saved.append, already_saved=lambda step: False)
    try:
        guard.on_step_end(3)
        assert saved == [], "no signal, no checkpoint"
        os.kill(os.getpid(), sig)  # the handler only notes it: the process keeps running
        assert saved == []
        with pytest.raises(Preempted) as exc:
            guard.on_step_end(4)
        assert saved == [4] and exc.value.code == PREEMPTED_EXIT_CODE and exc.value.step == 4
    finally:
        guard.close()
    assert signal.getsignal(sig) is not guard._note, "the previous handler is restored"


def test_a_step_the_cadence_just_saved_is_not_saved_twice():
    saved = []
    guard = PreemptionGuard(saved.append, already_saved=lambda step: step % 4 == 0)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Preempted):
            guard.on_step_end(8)
        assert saved == []
    finally:
        guard.close()
