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


def test_online_wandb_gives_up_within_30_seconds(no_account: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    from crosscoder_pl.loggers import _with_init_timeout

    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    assert _with_init_timeout(None).init_timeout <= 30  # wandb's own default is 90 s
    assert _with_init_timeout({"init_timeout": 5}).init_timeout == 5  # the caller's choice stands
    assert _with_init_timeout(wandb.Settings(init_timeout=7, mode="offline")).mode == "offline"
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "12")
    assert _with_init_timeout(None).init_timeout == 12
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    logger = wandb_logger(save_dir=str(no_account))
    assert logger._wandb_init["settings"].init_timeout == 12  # what wandb.init will get
