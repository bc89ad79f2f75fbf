"""The W&B logger never blocks: offline without an API key, online with one."""

from pathlib import Path

import pytest

from crosscoder_pl.loggers import wandb_logged_in, wandb_logger


@pytest.fixture
def no_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_without_an_account_wandb_logs_offline(no_account: Path) -> None:
    assert not wandb_logged_in()
    logger = wandb_logger(project="p", save_dir=str(no_account))
    assert logger._offline


def test_a_netrc_entry_or_api_key_counts_as_logged_in(no_account: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (no_account / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (no_account / ".netrc").chmod(0o600)
    assert wandb_logged_in()
    (no_account / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_logged_in()
    assert not wandb_logger(project="p", save_dir=str(no_account))._offline
