"""Nothing read from an artifact, a checkpoint or the hub chooses code to run; the hub never hangs.

Each hostile input names code that writes a marker file if it ever runs: the marker must never appear,
and the error must name what was refused.
"""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from crosscoder_pl.artifact.reader import check_train_config
from crosscoder_pl.commands.dispatch import analyze
from crosscoder_pl.config import RunConfig
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.training import check_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def write_marker(path: str, **_: object) -> None:
    """What a hostile ``_target_`` names: proof that code from a file ran."""
    Path(path).write_text("code from a file ran")


class Boom:
    """A pickle payload: unpickling it runs ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def compose_config(name: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def train_config(*overrides: str) -> dict:
    """The groups analyze.py reads, as train.py records them (resolved); the tiny experiment by default."""
    cfg = compose_config("train", "output_dir=/tmp/unused", *(overrides or ["+experiment=tiny"]))
    return {key: cfg[key] for key in ("model_pair", "data", "analysis", "dashboard") if key in cfg}


@pytest.mark.parametrize(
    "overrides",
    [[], ["+experiment=papergrade"], ["data=cached", "data.path=/tmp/acts"],
     ["+experiment=own_pair", "model_pair.base=a", "model_pair.chat=b"],
     ["+experiment=own_pair", "model_pair=gemma3_270m_sharegpt", "data=cached", "data.path=/tmp/acts"]],
    ids=["tiny", "papergrade", "cached", "own_pair", "own_pair-chat_tune-cached"],
)
def test_every_config_train_py_records_passes_the_artifact_check(overrides: list[str]) -> None:
    check_train_config(train_config(*overrides))


def hostile(marker: Path) -> dict[str, tuple[str, object, str]]:
    """Where a hostile artifact puts code: dotted key -> (value, what the error must name)."""
    call = {"_target_": "test_safety.write_marker", "path": str(marker)}
    shell = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    return {
        "pair-target": ("model_pair", call, "model_pair._target_='test_safety.write_marker'"),
        "pair-os-system": ("model_pair", shell, "model_pair._target_='os.system'"),
        "data-target": ("data", {**train_config()["data"], **call}, "data._target_='test_safety.write_marker'"),
        "source-target": ("data.web", call, "data.web._target_='test_safety.write_marker'"),
        "nested-target": ("model_pair.base", shell, "model_pair.base._target_='os.system': no _target_ belongs there"),
        "interpolation": ("data.seed", "${oc.env:HOME}", "data.seed='${oc.env:HOME}' is an interpolation"),
    }


@pytest.mark.parametrize("case", list(hostile(Path("x"))))
def test_a_hostile_artifact_runs_nothing_and_is_refused_by_name(tmp_path: Path, case: str) -> None:
    marker = tmp_path / "MARKER"
    key, value, named = hostile(marker)[case]
    config = train_config()
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value
    artifact = tmp_path / "artifact"
    CrossCoder(4, 8, 2).save_pretrained(artifact)
    (artifact / "train_config.yaml").write_text(yaml.safe_dump(config))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("analyze", overrides=[f"artifact={artifact}"])
    with pytest.raises(ValueError, match="is refused") as error:
        analyze(cfg, [])
    assert named in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "path", ["https://example.com/last.ckpt", "http://10.0.0.1/last.ckpt", "s3://bucket/last.ckpt",
             "gs://bucket/last.ckpt", "hf://user/repo/last.ckpt", "file:///tmp/last.ckpt", "registry:model:v1"]
)
def test_remote_checkpoints_are_refused_before_anything_loads(path: str) -> None:
    with pytest.raises(ValueError, match=f"ckpt_path={path} is remote.*pass the local file"):
        check_checkpoint(path)


def test_hostile_checkpoints_are_refused_before_anything_unpickles_them(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    zipped, raw = tmp_path / "zipped.ckpt", tmp_path / "raw.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": Boom(marker)}, zipped)
    raw.write_bytes(pickle.dumps({"state_dict": Boom(marker)}))
    with pytest.raises(ValueError, match=r"ckpt_path=.*zipped.ckpt names code that loading it would run \(posix.system"):
        check_checkpoint(str(zipped))
    with pytest.raises(ValueError, match="raw.ckpt is not a checkpoint written by torch.save"):
        check_checkpoint(str(raw))
    with pytest.raises(FileNotFoundError, match="no such file.*ckpt_path=null"):
        check_checkpoint(str(tmp_path / "missing.ckpt"))
    legit = tmp_path / "legit.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 0, "hyper_parameters": {"k": 8, "betas": (0.9, 0.99)}}, legit)
    for ok in (str(legit), "last", None):
        check_checkpoint(ok)
    assert not marker.exists()


def test_train_py_refuses_a_hostile_checkpoint_at_start_up(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "loops": Boom(marker)}, checkpoint)
    result = subprocess.run([sys.executable, "train.py", "+experiment=tiny", f"ckpt_path={checkpoint}",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "names code that loading it would run (posix.system)" in result.stderr
    assert "Restoring states" not in result.stdout + result.stderr  # refused before Lightning saw it
    assert not marker.exists()


class FitCalled(Exception):
    pass


def test_train_resumes_through_the_weights_only_unpickler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second guard, after check_checkpoint: Lightning loads the checkpoint with weights_only=True."""
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    calls = []

    def fit(self, *args, **kwargs):
        calls.append(kwargs)
        raise FitCalled

    monkeypatch.setattr(L.Trainer, "fit", fit)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=tiny", f"output_dir={tmp_path}", f"ckpt_path={checkpoint}"])
    with pytest.raises(FitCalled):
        train(RunConfig.from_hydra(cfg))
    assert calls[0]["weights_only"] is True and calls[0]["ckpt_path"] == str(checkpoint)


# ---------------------------------------------------------------------------------------------------- the hub
LOAD = """
from crosscoder_pl import CrossCoder
try:
    print(CrossCoder.from_pretrained("user/repo").n_latents)
except Exception as err:
    print(type(err).__name__, err)
"""


def load_from_hub(endpoint: str, **env: str) -> str:
    """``CrossCoder.from_pretrained("user/repo")`` in a fresh process (huggingface_hub reads its settings at
    import) with the hub at ``endpoint``. The timeout only catches a hang."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, **env}
    result = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


OFFLINE_ADVICE = ("HF_HUB_OFFLINE=1", "local directory", "HF_HUB_ETAG_TIMEOUT")


def test_an_unreachable_hub_fails_with_how_to_run_offline(tmp_path: Path) -> None:
    out = load_from_hub(f"http://127.0.0.1:{closed_port()}", HF_HUB_CACHE=str(tmp_path))
    assert out.startswith("ConnectionError could not load the crosscoder 'user/repo'") and "Connection refused" in out
    assert all(advice in out for advice in OFFLINE_ADVICE)


def test_a_silent_hub_is_given_up_on_after_the_etag_timeout(tmp_path: Path) -> None:
    """A hub that accepts the connection and never answers: huggingface_hub alone waits for minutes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nobody ever reads or answers
        out = load_from_hub(f"http://127.0.0.1:{silent.getsockname()[1]}", HF_HUB_CACHE=str(tmp_path),
                            HF_HUB_ETAG_TIMEOUT="2")
    assert out.startswith("ConnectionError") and "within HF_HUB_ETAG_TIMEOUT=2 s" in out
    assert all(advice in out for advice in OFFLINE_ADVICE)


def test_a_cached_hub_copy_loads_without_asking_the_hub(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--user--repo" / "snapshots" / ("0" * 40)
    CrossCoder(4, 8, 2).save_pretrained(snapshot)
    (tmp_path / "models--user--repo" / "refs").mkdir()
    (tmp_path / "models--user--repo" / "refs" / "main").write_text("0" * 40)
    with socket.socket() as silent:  # any request would hang until the timeout and fail
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        out = load_from_hub(f"http://127.0.0.1:{silent.getsockname()[1]}", HF_HUB_CACHE=str(tmp_path))
    assert out.strip() == "8"
    offline = load_from_hub("http://127.0.0.1:9", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty"))
    assert offline.startswith("FileNotFoundError") and "offline mode is on" in offline
    assert json.loads((snapshot / "config.json").read_text())["n_latents"] == 8
