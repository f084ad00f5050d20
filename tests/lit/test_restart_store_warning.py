"""restart_store_warning: a torchrun that may restart its workers into the dead attempt's store is warned about."""

from __future__ import annotations

import pytest

from mf_lightning.lit.torchrun_restarts import restart_store_warning

TORCHRUN = {"TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}


def test_restarts_into_the_agents_store_are_warned_about():
    warning = restart_store_warning(TORCHRUN)
    assert warning is not None
    assert "--max-restarts 3" in warning and "--rdzv-backend c10d" in warning
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in warning


@pytest.mark.parametrize(
    "changed",
    [
        {"TORCHELASTIC_USE_AGENT_STORE": "False"},  # c10d with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
        {"TORCHELASTIC_MAX_RESTARTS": "0"},
        {"TORCHELASTIC_RUN_ID": None},  # not under torchrun
    ],
    ids=["own-store", "no-restarts", "no-torchrun"],
)
def test_nothing_is_said_when_a_restart_gets_a_store_of_its_own_or_cannot_happen(changed):
    environ = {key: value for key, value in {**TORCHRUN, **changed}.items() if value is not None}
    assert restart_store_warning(environ) is None
