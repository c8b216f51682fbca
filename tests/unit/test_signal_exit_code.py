"""`NVEMBED_SIGNAL_EXIT`: the launcher's exit code after a signal stopped training with nothing
lost (examples/slurm_train.sh sets 75 and requeues the job on it)."""

import pytest

from megatron_nvembed.training.torchrun import signal_exit_code


def test_unset_is_0(monkeypatch):
    monkeypatch.delenv("NVEMBED_SIGNAL_EXIT", raising=False)
    assert signal_exit_code() == 0


def test_a_set_code_is_used(monkeypatch):
    monkeypatch.setenv("NVEMBED_SIGNAL_EXIT", "75")
    assert signal_exit_code() == 75


@pytest.mark.parametrize("value", ["-1", "256", "x", "7.5", ""])
def test_a_value_that_is_no_exit_code_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("NVEMBED_SIGNAL_EXIT", value)
    with pytest.raises(ValueError, match="NVEMBED_SIGNAL_EXIT"):
        signal_exit_code()
