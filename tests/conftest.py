import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

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
