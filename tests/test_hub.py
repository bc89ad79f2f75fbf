"""Publishing on the Hub, without the network: the card parses with huggingface_hub, the upload gets the
artifact's files, and a push without offline access or token fails at once naming the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from hydra import compose, initialize_config_dir

import crosscoder_pl.hub as hub
from crosscoder_pl.analysis.card_metadata import TAGS
from crosscoder_pl.commands.dispatch import analyze

ROOT = Path(__file__).resolve().parents[1]


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def artifact(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run's artifact (pushing rewrites its README), with the pair renamed to hub ids."""
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["artifact"].update(base_model="google/gemma-2-2b", chat_model="google/gemma-2-2b-it")
    (copy / "metrics.json").write_text(json.dumps(metrics))
    return copy


class Recorder:
    """Stands in for HfApi's network calls; keeps what they received."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id: str, **kwargs) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> None:
        self.calls.append(("upload_folder", kwargs))
        self.uploaded = files_of(Path(kwargs["folder_path"]))


def test_card_is_built_with_model_card_data_and_parses_back(artifact: Path) -> None:
    card = hub.build_card(artifact)
    path = artifact / "card.md"
    card.save(path)
    back = ModelCard.load(path)
    data = back.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert set(TAGS) <= set(data["tags"])
    assert data["base_model"] == ["google/gemma-2-2b", "google/gemma-2-2b-it"]
    metrics = json.loads((artifact / "metrics.json").read_text())
    values = {r.metric_type: r.metric_value for r in back.data.eval_results}
    assert values["variance_explained_base"] == pytest.approx(metrics["validation"]["variance_explained"]["base"])
    assert values["l0"] == pytest.approx(metrics["validation"]["l0"])
    assert values["dead_fraction"] == pytest.approx(metrics["validation"]["dead_fraction"])
    assert values["median_causal_pearson"] == pytest.approx(metrics["causal"]["median_pearson"])
    # The body is the artifact's own card, front matter replaced (one block of it).
    assert back.text.lstrip().startswith("# Cross-Model Crosscoder")
    assert str(back).count("\n---\n") == 1


def test_embedded_pair_is_not_listed_as_a_hub_base_model(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert hub.card_data(metrics).base_model is None  # embedded-tiny:base is no hub id


def test_push_uploads_exactly_the_artifact_files(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: recorder.create_repo(repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: recorder.upload_folder(**kw))
    probes: list[str] = []
    monkeypatch.setattr(hub, "check_hub_access", lambda repo_id: probes.append(repo_id) or "token")  # no network
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("analyze", overrides=[f"artifact={artifact}", "push_to_hub=someone/tiny-crosscoder",
                                            "hub_private=true"])
    analyze(cfg, [])
    assert probes == ["someone/tiny-crosscoder"]  # the hub is asked once, before anything is imported or written
    (name, create), (name2, upload) = recorder.calls
    assert (name, name2) == ("create_repo", "upload_folder")
    assert create["repo_id"] == "someone/tiny-crosscoder" and create["private"] is True
    assert upload["repo_id"] == "someone/tiny-crosscoder" and Path(upload["folder_path"]) == artifact
    assert recorder.uploaded == files_of(artifact)  # every file, byte for byte, and nothing else
    assert {"README.md", "model.safetensors", "config.json", "metrics.json"} <= set(recorder.uploaded)
    assert any(name.startswith("dashboard/") for name in recorder.uploaded)
    assert ModelCard.load(artifact / "README.md").data.license == "apache-2.0"


def test_push_without_offline_access_fails_at_once_naming_the_fix(artifact: Path) -> None:
    before = files_of(artifact)
    result = subprocess.run([sys.executable, "analyze.py", f"artifact={artifact}", "push_to_hub=someone/x",
                             f"hydra.run.dir={artifact.parent / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in result.stderr and "unset HF_HUB_OFFLINE" in result.stderr
    assert files_of(artifact) == before  # nothing was touched


def test_no_token_and_no_network_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="hf auth login.*HF_TOKEN"):
        hub.check_hub_access("someone/x")
    monkeypatch.setattr(hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    with pytest.raises(ConnectionError, match="127.0.0.1:9 is not reachable"):
        hub.check_hub_access("someone/x")
    with pytest.raises(ValueError, match="not a hub repo id"):
        hub.check_hub_access("not a repo")
