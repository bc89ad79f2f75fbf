"""A hub that does not answer: every path that goes to it gives up after HF_HUB_ETAG_TIMEOUT seconds with an
error naming what was fetched and how to run offline (no network: the hub is a local socket that accepts
connections and never answers, or a port that refuses them)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

from crosscoder_pl import network
from crosscoder_pl.data.sources import SourceConfig, is_hub_dataset

ROOT = Path(__file__).resolve().parents[1]

# Each path in one fresh process (huggingface_hub and datasets read HF_ENDPOINT and the timeouts at import);
# prints one JSON line per path: the error it ended in and the seconds it took.
PATHS = """
import json, sys, time
from pathlib import Path

def attempt(name, call):
    start = time.monotonic()
    try:
        call()
        outcome = {"error": None}
    except Exception as err:
        outcome = {"error": type(err).__name__, "message": str(err)}
    print(json.dumps({"path": name, "seconds": time.monotonic() - start, **outcome}), flush=True)

from crosscoder_pl import CrossCoder
from crosscoder_pl.data.sources import SourceConfig, load_rows
from crosscoder_pl.hub import push_artifact
from crosscoder_pl.models.pair import load_model_pair, read_hidden_size

artifact = Path(sys.argv[1])
attempt("dataset", lambda: load_rows(SourceConfig("HuggingFaceFW/fineweb-edu", "text", name="sample-10BT")))
attempt("hidden_size", lambda: read_hidden_size("google/gemma-2-2b"))
attempt("pair", lambda: load_model_pair("google/gemma-2-2b", "google/gemma-2-2b-it", layer=None))
attempt("push", lambda: push_artifact(artifact, "someone/crosscoder"))
attempt("crosscoder", lambda: CrossCoder.from_pretrained("someone/crosscoder"))
"""


def black_hole() -> socket.socket:
    """A listening socket nobody reads: the kernel completes the handshakes, no byte ever comes back."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    return hole


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def silent_hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], Path, dict[str, bytes]]:
    """What each path ended in with the hub at a black hole and HF_HUB_ETAG_TIMEOUT=2; the pushed artifact and
    its files before the push."""
    tmp = tmp_path_factory.mktemp("silent_hub")
    from crosscoder_pl import CrossCoder

    artifact = tmp / "artifact"
    CrossCoder(4, 8, 2).save_pretrained(artifact)
    (artifact / "metrics.json").write_text("{}")
    before = files_of(artifact)
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with black_hole() as hole:
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{hole.getsockname()[1]}", HF_HUB_ETAG_TIMEOUT="2",
                   HF_HOME=str(tmp / "hf"), HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN="hf_not_a_real_token")
        result = subprocess.run([sys.executable, "-c", PATHS, str(artifact)], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=180, check=False)  # a hang guard only (the libraries alone: minutes)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {o["path"]: o for o in outcomes}, artifact, before


HONOURED = "within HF_HUB_ETAG_TIMEOUT=2 s"  # the user's setting, not a built-in one, bounded the wait


def test_a_silent_hub_dataset_is_an_error_saying_how_to_run_offline(silent_hub) -> None:
    outcome = silent_hub[0]["dataset"]
    assert outcome["error"] == "SourceUnavailableError"
    message = outcome["message"]
    assert "path='HuggingFaceFW/fineweb-edu'" in message and HONOURED in message
    assert "hf download HuggingFaceFW/fineweb-edu --repo-type dataset" in message
    assert "path=parquet, name=null" in message and "data=embedded" in message and "python train.py" in message


@pytest.mark.parametrize("path", ["hidden_size", "pair"])
def test_a_silent_hub_model_is_an_error_saying_how_to_run_offline(silent_hub, path: str) -> None:
    outcome = silent_hub[0][path]
    assert outcome["error"] == "RuntimeError"
    message = outcome["message"]
    assert "could not load 'google/gemma-2-2b'" in message and HONOURED in message
    assert "hf download google/gemma-2-2b" in message and "HF_HUB_OFFLINE=1" in message
    assert "local directories" in message and "embedded:base / embedded:chat" in message


def test_a_push_to_a_silent_hub_is_an_error_and_changes_nothing(silent_hub) -> None:
    outcomes, artifact, before = silent_hub
    outcome = outcomes["push"]
    assert outcome["error"] == "ConnectionError"
    assert "cannot push to someone/crosscoder" in outcome["message"] and HONOURED in outcome["message"]
    assert "copy the artifact to a machine that reaches the Hub" in outcome["message"]
    assert files_of(artifact) == before  # the card was not rewritten



def test_a_silent_hub_crosscoder_is_an_error_saying_how_to_run_offline(silent_hub) -> None:
    outcome = silent_hub[0]["crosscoder"]
    assert outcome["error"] == "ConnectionError"
    assert "could not load the crosscoder 'someone/crosscoder'" in outcome["message"]
    assert HONOURED in outcome["message"] and "HF_HUB_OFFLINE=1" in outcome["message"]


# --------------------------------------------------------------------------------- ask_hub itself, in process
@pytest.fixture()
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    return 0.5


def test_a_request_stuck_past_the_timeout_is_given_up_on(short_timeout: float) -> None:
    """Even when the request itself would never end (a name lookup that hangs has no timeout of its own)."""
    release = threading.Event()
    given: list[float] = []

    def stuck(timeout: float) -> None:
        given.append(timeout)
        release.wait()

    try:
        with pytest.raises(network.HubUnreachableError, match="no answer within HF_HUB_ETAG_TIMEOUT=0.5 s"):
            network.ask_hub(stuck)
    finally:
        release.set()
    assert given == [short_timeout]  # the request got the same timeout for its own transport


def answered(status: int) -> HfHubHTTPError:
    request = httpx2.Request("GET", "http://hub.invalid/api/models/a/b")
    return HfHubHTTPError(f"{status} from the hub", response=httpx2.Response(status, request=request))


def test_answers_pass_and_an_overloaded_hub_counts_as_unreachable(short_timeout: float) -> None:
    assert network.ask_hub(lambda timeout: "info") == "info"
    with pytest.raises(HfHubHTTPError, match="404 from the hub"):  # answered: the caller names the problem
        network.ask_hub(lambda timeout: (_ for _ in ()).throw(answered(404)))
    with pytest.raises(network.HubUnreachableError, match=r"HfHubHTTPError: 503 from the hub"):  # retried for minutes
        network.ask_hub(lambda timeout: (_ for _ in ()).throw(answered(503)))
    with pytest.raises(network.HubUnreachableError, match=r"ConnectError: refused"):
        network.ask_hub(lambda timeout: (_ for _ in ()).throw(httpx2.ConnectError("refused")))


def test_only_hub_ids_are_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "web").mkdir(parents=True)
    assert is_hub_dataset(SourceConfig("HuggingFaceFW/fineweb-edu", "text"))
    assert not is_hub_dataset(SourceConfig("json", "text", data_files="web/*.jsonl"))  # a packaged builder
    assert not is_hub_dataset(SourceConfig("data/web", "text"))  # a local directory
    assert not is_hub_dataset(SourceConfig("./x", "text")) and not is_hub_dataset(SourceConfig("/abs/x", "text"))


def test_the_default_timeout_is_huggingface_hubs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", constants.DEFAULT_ETAG_TIMEOUT)
    assert network.hub_timeout() == 10.0
    assert "raise HF_HUB_ETAG_TIMEOUT (seconds, now 10)" in network.timeout_advice()
