"""Inputs that cannot train fail before the process group starts and the run directory is written."""
import pytest

from multiproc import launch, write_config


@pytest.mark.slow
def test_a_window_longer_than_the_data_fails_before_anything_is_written(tmp_path, data_dir):
    run = launch(write_config(tmp_path / "tiny.yaml", data_dir), tmp_path / "run", "data.seq_len=100000", nproc=1)
    assert run.wait() != 0
    assert "data.seq_len=100000 is longer than the data" in run.output()
    assert "deepspeed" not in run.output().lower()  # DeepSpeed never started
    assert not (tmp_path / "run").exists()
