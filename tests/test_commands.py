"""analyze.py's dispatch picks one command per command line, as before the commands had modules of their own; the
artifact's reader accepts the data module at its old and new addresses."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from crosscoder_pl.artifact.reader import check_train_config
from crosscoder_pl.commands import (
    import_checkpoint,
    push,
    reanalyse,
    serve,
    sweep_summary,
)
from crosscoder_pl.commands.dispatch import choose

KEYS = {"artifact": None, "sweep": None, "push_to_hub": None, "checkpoint": None, "serve": False}


@pytest.mark.parametrize(
    ("given", "module"),
    [
        ({"artifact": "a"}, reanalyse),
        ({"artifact": "a", "serve": True}, serve),
        ({"artifact": "a", "checkpoint": "c"}, import_checkpoint),
        ({"artifact": "a", "checkpoint": "c", "serve": True}, import_checkpoint),
        ({"artifact": "a", "push_to_hub": "u/n", "checkpoint": "c"}, push),
        ({"sweep": "multirun/x", "push_to_hub": "u/n"}, sweep_summary),
    ],
)
def test_the_first_key_set_chooses_the_command(given, module) -> None:
    assert choose(OmegaConf.create({**KEYS, **given})).run is module.run


@pytest.mark.parametrize("given", [{}, {"serve": True}, {"checkpoint": "c"}, {"push_to_hub": "u/n"}])
def test_every_command_but_the_sweep_needs_an_artifact(given) -> None:
    with pytest.raises(ValueError, match="artifact=DIR is required"):
        choose(OmegaConf.create({**KEYS, **given}))


@pytest.mark.parametrize("module", ["crosscoder_pl.data.datamodule", "crosscoder_pl.data.cached"])
def test_the_reader_accepts_the_cached_data_module_at_both_addresses(module: str) -> None:
    check_train_config({"model_pair": {}, "data": {"_target_": f"{module}.CachedActivationDataModule"}})
    with pytest.raises(ValueError, match="not one of this project's builders"):
        check_train_config({"model_pair": {}, "data": {"_target_": f"{module}.Elsewhere"}})
