"""write_artifact: the whole artifact, replaced atomically; a killed write is refused by every reader; file modes."""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from test_analysis_causal import tiny_pair
from test_analysis_report import crosscoder, inputs, settings

from crosscoder_pl.artifact.writer import write_artifact
from crosscoder_pl.commands.dispatch import analyze
from crosscoder_pl.config import AnalysisConfig
from crosscoder_pl.crosscoder import INCOMPLETE, CrossCoder

ROOT = Path(__file__).resolve().parents[1]
WRITTEN = {"config.json", "model.safetensors", "train_config.yaml", "taxonomy.json", "latents.csv",
           "delta_norm_histogram.png", "metrics.json", "README.md"}


def quick_settings() -> dict:
    """The analyses' settings with only the fast ones on (validation and taxonomy)."""
    cfg = settings()
    for group in ("scaling", "causal", "splice"):
        cfg[group]["enabled"] = False
    return cfg


@pytest.fixture(scope="module")
def data() -> SimpleNamespace:
    """What write_artifact reads from a datamodule, on a random tiny Gemma-2 pair."""
    pair = tiny_pair(identical=False)
    paired, ids, mask = inputs(pair)
    return SimpleNamespace(model_pair=pair, heldout_activations=lambda: paired, probe_batch=lambda: (ids, mask))


def write(directory: Path, data: SimpleNamespace, seed: int = 0) -> dict:
    cc = crosscoder(data.heldout_activations())
    cc.metadata["seed"] = seed  # tells two writes apart (config.json)
    return write_artifact(directory, cc, data, AnalysisConfig.read(quick_settings()), {"seed": seed}, "python train.py")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_writes_the_whole_artifact_and_replaces_it_whole(tmp_path: Path, data: SimpleNamespace) -> None:
    artifact = tmp_path / "artifact"
    write(artifact, data, seed=1)
    assert WRITTEN <= set(snapshot(artifact))
    assert CrossCoder.from_pretrained(artifact).metadata["seed"] == 1
    (artifact / "notes.txt").write_text("mine")  # the user's own file
    write(artifact, data, seed=2)
    assert CrossCoder.from_pretrained(artifact).metadata["seed"] == 2
    assert "seed: 2" in (artifact / "train_config.yaml").read_text()
    assert (artifact / "notes.txt").read_text() == "mine", "rewriting an artifact keeps what it did not write"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"], "no partial or set-aside directory left over"


def test_a_failure_mid_write_leaves_the_previous_artifact_untouched(
    tmp_path: Path, data: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = tmp_path / "artifact"
    write(artifact, data, seed=1)
    before = snapshot(artifact)

    def fail_midway(*args, **kwargs):
        out = Path(args[5])
        (out / "taxonomy.json").write_text("{}")  # some files written, then the analyses fail
        raise RuntimeError("out of memory in the causal analysis")

    monkeypatch.setattr("crosscoder_pl.artifact.writer.run_analyses", fail_midway)
    with pytest.raises(RuntimeError, match="out of memory"):
        write(artifact, data, seed=2)
    assert snapshot(artifact) == before
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"], "the partial directory is removed on an error"


KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
import crosscoder_pl.artifact.writer as artifact_module
from test_artifact import data_of, write

real = artifact_module.run_analyses

def killed(*args, **kwargs):
    real(*args, **kwargs)  # every analysis file written ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... then killed before the artifact is marked complete

artifact_module.run_analyses = killed
write(Path(sys.argv[1]), data_of(), seed=2)
"""


def data_of() -> SimpleNamespace:
    """`data` outside pytest (for the killed subprocess)."""
    pair = tiny_pair(identical=False)
    paired, ids, mask = inputs(pair)
    return SimpleNamespace(model_pair=pair, heldout_activations=lambda: paired, probe_batch=lambda: (ids, mask))


@pytest.mark.parametrize("previous", [True, False], ids=["over-an-artifact", "first-write"])
def test_a_killed_write_leaves_the_previous_artifact_or_none_and_a_partial_one_every_reader_refuses(
    tmp_path: Path, data: SimpleNamespace, previous: bool
) -> None:
    artifact = tmp_path / "artifact"
    if previous:
        write(artifact, data, seed=1)
    before = snapshot(artifact) if previous else None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITE), str(artifact)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL

    if previous:
        assert snapshot(artifact) == before
    else:
        assert not artifact.exists()
        with pytest.raises(FileNotFoundError, match="no crosscoder at"):
            CrossCoder.from_pretrained(artifact)
    (partial,) = tmp_path.glob(".artifact.partial-*")
    assert (partial / INCOMPLETE).exists() and (partial / "metrics.json").exists()  # all written but not complete
    with pytest.raises(ValueError, match="is an incomplete artifact"):
        CrossCoder.from_pretrained(partial)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("analyze", overrides=[f"artifact={partial}"])
    with pytest.raises(ValueError, match="is an incomplete artifact"):
        analyze(cfg, [])


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_get_the_mode_the_umask_gives(
    tmp_path: Path, data: SimpleNamespace, mask: int, file_mode: int, dir_mode: int
) -> None:
    old = os.umask(mask)
    try:
        write(tmp_path / "artifact", data)
        CrossCoder(4, 8, 2).save_pretrained(tmp_path / "weights")
    finally:
        os.umask(old)
    paths = [tmp_path / "artifact", tmp_path / "weights", *(tmp_path / "artifact").rglob("*"), *(tmp_path / "weights").iterdir()]
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in paths}
    expected = {name: dir_mode if (tmp_path / name).is_dir() else file_mode for name in modes}
    assert modes == expected
    assert "artifact/model.safetensors" in modes and "weights/model.safetensors" in modes


def test_analyze_rewrites_a_trained_artifact_through_the_same_writer(tmp_path: Path, tiny_run: Path) -> None:
    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_run, artifact)
    (artifact / "notes.txt").write_text("mine")
    before = snapshot(artifact)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("analyze", overrides=[f"artifact={artifact}"])
    analyze(cfg, [])
    after = snapshot(artifact)
    assert set(after) == set(before)
    for name in ("model.safetensors", "config.json", "train_config.yaml", "taxonomy.json", "latents.csv", "notes.txt"):
        assert after[name] == before[name], name  # the same weights and figures, re-saved byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]
