"""``StopSignals``: a stop signal raises while preparing, is noted while training, and the handlers are given back."""

from __future__ import annotations

import os
import signal

import pytest

from mf_lightning.lit.stop_signals import STOP_SIGNALS, StoppedBySignal, StopSignals, exit_status


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: s.name)
def test_outside_the_fit_loop_a_stop_signal_raises_and_the_handlers_are_given_back(signum):
    before = {stop: signal.getsignal(stop) for stop in STOP_SIGNALS}
    with pytest.raises(StoppedBySignal) as stopped, StopSignals().owning():
        os.kill(os.getpid(), signum)
    assert stopped.value.signum == signum
    assert {stop: signal.getsignal(stop) for stop in STOP_SIGNALS} == before


def test_while_noting_signals_are_recorded_and_a_second_sigint_stops_at_once():
    with StopSignals().owning() as signals:
        signals.note()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == {signal.SIGUSR1, signal.SIGINT}
        with pytest.raises(StoppedBySignal) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.signum == signal.SIGINT and stopped.value.during_training


@pytest.mark.parametrize("noting", [False, True], ids=["preparing", "training"])
def test_once_stopping_later_signals_are_only_recorded_so_the_unwinding_finishes(noting):
    """A repeated signal (a scheduler signalling twice) must not interrupt the ``finally`` blocks of the first stop."""
    with StopSignals().owning() as signals:
        if noting:
            signals.note()
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(StoppedBySignal) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
        assert stopped.value.during_training == noting
        for signum in STOP_SIGNALS:
            os.kill(os.getpid(), signum)
        assert signals.received == set(STOP_SIGNALS)


def test_the_exit_status_is_143_for_a_schedulers_signal_and_130_for_sigint_alone():
    assert exit_status({signal.SIGUSR1}) == exit_status({signal.SIGTERM, signal.SIGINT}) == 143
    assert exit_status({signal.SIGINT}) == 130


def test_after_the_fit_loop_signals_are_only_recorded_until_a_new_stage_stops_on_them_again():
    """``finish`` (the fit loop ended): a signal then cannot interrupt the clean-up; ``stop`` (an evaluation next)."""
    with StopSignals().owning() as signals:
        signals.note()
        signals.finish()
        for signum in STOP_SIGNALS:
            os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == set(STOP_SIGNALS)
        signals.stop()
        with pytest.raises(StoppedBySignal) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
    assert not stopped.value.during_training
