"""Publishing an artifact on the Hugging Face Hub (``python analyze.py artifact=DIR push_to_hub=user/name``).

The card's metadata (license, tags, base models, evaluation results from ``metrics.json``) is built with
huggingface_hub's ``ModelCardData`` (`crosscoder_pl.analysis.card_metadata.card_data`) and the card itself
with ``ModelCard``, so the Hub reads it as it reads any model card; the upload is one ``HfApi.upload_folder`` of the whole artifact directory.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

from crosscoder_pl.analysis.card_metadata import REPO_ID, card_data
from crosscoder_pl.crosscoder import check_complete
from crosscoder_pl.files import write_whole
from crosscoder_pl.network import HubUnreachableError, ask_hub, timeout_advice

log = logging.getLogger(__name__)
FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)


def check_hub_access(repo_id: str) -> str:
    """The token to push with; raises at once, naming the fix, when the repo id is malformed, offline mode is
    on, no token is configured or the Hub gives no answer to one request within ``HF_HUB_ETAG_TIMEOUT`` s
    (`crosscoder_pl.network.ask_hub`; the push itself would wait on a silent Hub for ever)."""
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id):
        raise ValueError(f"push_to_hub={repo_id!r} is not a hub repo id: use user/name (or organisation/name)")
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(
            f"cannot push to {repo_id}: huggingface_hub's offline mode is on (HF_HUB_OFFLINE=1). Unset it "
            "(unset HF_HUB_OFFLINE) on a machine that reaches the Hub, or copy the artifact there and push from it"
        )
    token = get_token()
    if not token:
        raise PermissionError(
            f"cannot push to {repo_id}: no Hugging Face token. Run `hf auth login` (a token with write access, "
            "https://huggingface.co/settings/tokens) or set HF_TOKEN, then run the same command again"
        )
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    api = HfApi(endpoint=constants.ENDPOINT, token=token)
    try:
        ask_hub(lambda timeout: api.repo_info(repo_id, repo_type="model", timeout=timeout))
    except HubUnreachableError as err:
        raise ConnectionError(
            f"cannot push to {repo_id}: the Hub at {host}:{port} is not reachable ({err}). Check the network (or "
            "HF_ENDPOINT), or copy the artifact to a machine that reaches the Hub and push from there; the artifact "
            f"directory is complete as it is (it works offline); {timeout_advice()}"
        ) from err
    except HfHubHTTPError:  # an answer (e.g. 404: the push creates the repo): the Hub is there
        pass
    return token


def build_card(artifact: str | Path, license: str = "apache-2.0") -> ModelCard:
    """The artifact's card: ``card_data`` of its ``metrics.json`` over the body of its ``README.md``."""
    artifact = Path(artifact)
    metrics = json.loads((artifact / "metrics.json").read_text())
    readme = artifact / "README.md"
    body = FRONT_MATTER.sub("", readme.read_text()) if readme.is_file() else ""
    return ModelCard(f"---\n{card_data(metrics, license).to_yaml()}\n---\n{body}")


def push_artifact(artifact: str | Path, repo_id: str, private: bool = False, license: str = "apache-2.0",
                  api: HfApi | None = None) -> str:
    """Upload the whole artifact to ``repo_id`` (created if missing, private on request); return its URL.

    The card (``README.md``) is rebuilt first with `build_card`, in place, so that the Hub gets the same files
    as the directory holds. ``api``: None: one with the configured token, after `check_hub_access` (a Hub that
    does not answer is an error within seconds).
    """
    artifact = Path(artifact)
    check_complete(artifact)
    if not (artifact / "metrics.json").is_file():
        raise FileNotFoundError(f"{artifact} has no metrics.json: run python analyze.py artifact={artifact} first")
    api = api or HfApi(token=check_hub_access(repo_id))  # before the card is rewritten: a failure changes nothing
    card = build_card(artifact, license)
    write_whole(artifact / "README.md", lambda tmp: tmp.write_text(str(card)))
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=artifact, repo_type="model",
                      commit_message=f"crosscoder_pl artifact {artifact.name}")
    print(f"\npushed {artifact.resolve()} to {url}")
    return str(url)
