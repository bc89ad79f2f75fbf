"""Downloads from the Hugging Face hub, with timeouts: a saved crosscoder's files by hub id (`from_hub`, what
`CrossCoder.from_pretrained` does with a name that is not a local directory). Publishing is `crosscoder_pl.hub`.

huggingface_hub and `crosscoder_pl.network` are imported when a download is asked for, not with this module:
loading a local crosscoder needs neither. This module imports nothing else of the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def from_hub(repo_id: str, files: Sequence[str]) -> Path:
    """The hub repo's ``files``: from the local cache if there, else downloaded after one probe request that
    gives up after ``HF_HUB_ETAG_TIMEOUT`` s (huggingface_hub's own calls retry a silent hub for minutes)."""
    from huggingface_hub import model_info, snapshot_download

    from crosscoder_pl.network import (
        HubUnreachableError,
        ask_hub,
        hub_offline,
        hub_timeout,
    )

    files = list(files)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=files, local_files_only=True))
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: not in the cache
        pass
    if hub_offline():
        raise FileNotFoundError(_hub_failure(repo_id, "offline mode is on (HF_HUB_OFFLINE) and it is not in the cache"))
    try:
        ask_hub(lambda timeout: model_info(repo_id, timeout=timeout))
    except HubUnreachableError as err:
        raise ConnectionError(_hub_failure(repo_id, str(err))) from err
    except Exception as err:  # the hub answered with an error (not found, gated, no access)
        raise ConnectionError(_hub_failure(repo_id, f"{type(err).__name__}: {err}")) from err
    return Path(snapshot_download(repo_id, allow_patterns=files, etag_timeout=hub_timeout()))


def _hub_failure(repo_id: str, reason: str) -> str:
    from huggingface_hub import constants

    return (
        f"could not load the crosscoder {repo_id!r}: it is not a local directory, so it was looked up on the "
        f"Hugging Face hub ({constants.ENDPOINT}): {reason}. To run offline, pass the artifact's local directory, or "
        f"download it once where the hub is reachable (hf download {repo_id}) and set HF_HUB_OFFLINE=1 to use that "
        "cached copy; on a slow network raise HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT (seconds)."
    )
