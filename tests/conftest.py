import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# One throw-away cache for the whole session (subprocesses inherit it), never the user's.
_CACHE = tempfile.mkdtemp(prefix="crosscoder_pl_test_cache_")
os.environ["CROSSCODER_PL_CACHE"] = _CACHE

# Lightning's tips and PossibleUserWarnings are noise in test output.
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact of ``python train.py +experiment=tiny``, trained once per test session (seconds)."""
    out = tmp_path_factory.mktemp("tiny_run")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "train.py", "+experiment=tiny", f"hydra.run.dir={out}"], cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"artifact written to {out / 'artifact'}" in result.stdout
    return out / "artifact"
