"""Asking the Hugging Face hub once, with a deadline, before a call that would retry a silent hub for minutes.

huggingface_hub, transformers and datasets retry a hub that accepts connections and never answers: a file
not in the cache is asked for again with a 60 s timeout and five retries (about 6 minutes for a hub dataset,
whatever ``HF_HUB_ETAG_TIMEOUT`` says), and ``HfApi.create_repo`` has no timeout at all. So every path that
goes to the hub (`CrossCoder.from_pretrained`, the model pair, a hub dataset source, the push) first asks
the hub one cheap question (the repo's info, no retries) with `ask_hub`, which gives up after
`hub_timeout` seconds in all, connection and name resolution included, and raises `HubUnreachableError`.

The timeout is huggingface_hub's own setting, ``HF_HUB_ETAG_TIMEOUT`` (seconds; default 10, read when
huggingface_hub is imported): raise it on a slow network. With ``HF_HUB_OFFLINE=1`` nothing is asked.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

T = TypeVar("T")
TRUE = frozenset({"1", "ON", "YES", "TRUE"})
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # huggingface_hub retries these with backoff


class HubUnreachableError(ConnectionError):
    """The hub gave no answer (refused, unresolved, or silent past `hub_timeout`)."""


def hub_timeout() -> float:
    """Seconds the project waits for one answer of the hub: huggingface_hub's ``HF_HUB_ETAG_TIMEOUT``."""
    return float(constants.HF_HUB_ETAG_TIMEOUT)


def hub_offline() -> bool:
    """Whether offline mode is on (``HF_HUB_OFFLINE``, or transformers' ``TRANSFORMERS_OFFLINE``)."""
    # Read at call time too: huggingface_hub reads the variable once, at import.
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(flag is not None and flag.upper() in TRUE for flag in flags)


def timeout_advice() -> str:
    return f"on a slow network raise HF_HUB_ETAG_TIMEOUT (seconds, now {hub_timeout():g})"


def ask_hub(request: Callable[[float], T]) -> T:
    """``request(timeout)``, one request to the hub without retries, given up on after `hub_timeout` seconds.

    Returns its answer. An error the hub answered with (`HfHubHTTPError`: not found, gated, no access) is raised
    as it is; anything else is a `HubUnreachableError` saying why: refused, unresolved, timed out, no answer by
    the deadline, or an answer the libraries would retry on for minutes (408, 429, 5xx: a hub or proxy that is
    down). The request runs in a daemon thread, so that a stuck name lookup or connection cannot hold the
    caller past the deadline (the thread is left to end on its own).
    """
    timeout = hub_timeout()
    answers: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            answers.append(request(timeout))
        except Exception as err:  # handed over to the caller's thread
            errors.append(err)

    thread = threading.Thread(target=run, name="hub probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if answers:
        return answers[0]
    if not errors:
        raise HubUnreachableError(f"no answer within HF_HUB_ETAG_TIMEOUT={timeout:g} s")
    err = errors[0]
    if isinstance(err, HfHubHTTPError) and err.response.status_code not in RETRIED_STATUS:
        raise err
    raise HubUnreachableError(f"no usable answer within HF_HUB_ETAG_TIMEOUT={timeout:g} s ({type(err).__name__}: "
                              f"{_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]
