"""The online app through FastAPI's TestClient, on the tiny experiment's artifact: answers against direct
computations, limits, and the files it serves."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from omegaconf import OmegaConf

from crosscoder_pl.analysis.probes import kl_per_position, next_token_logprobs
from crosscoder_pl.config import ServerSettings
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.dashboard.online import OnlineSession
from crosscoder_pl.dashboard.server import create_app
from crosscoder_pl.hooks import residual_at
from crosscoder_pl.models.pair import load_model_pair

TEXT = "The cat sat on the mat and looked at the dog."
LIMITS = ServerSettings(max_request_bytes=4096, max_text_chars=1000, max_messages=4, max_prompt_tokens=48,
                        max_chosen_latents=3, top_latents=5, top_next_tokens=6)


def online_session(artifact: Path, settings: ServerSettings = LIMITS) -> OnlineSession:
    """The artifact's crosscoder and its model pair (the tiny embedded pair, from the session's cache)."""
    cfg = OmegaConf.load(artifact / "train_config.yaml").model_pair
    pair = load_model_pair(cfg.base, cfg.chat, cfg.layer, device="cpu", dtype="float32")
    return OnlineSession(CrossCoder.from_pretrained(artifact), pair, settings)


@pytest.fixture(scope="module")
def online(tiny_run: Path) -> SimpleNamespace:
    session = online_session(tiny_run)
    return SimpleNamespace(session=session, client=TestClient(create_app(session, tiny_run / "dashboard")),
                           pair=session.pair, cc=session.crosscoder)


def direct_codes(online: SimpleNamespace, ids: torch.Tensor) -> torch.Tensor:
    """``[seq, F]`` codes of a prompt computed here: both residuals, the crosscoder's own encode, BOS zeroed."""
    with torch.no_grad():
        models = (online.pair.base, online.pair.chat)
        residual = torch.stack([residual_at(m, online.pair.layer, input_ids=ids) for m in models], dim=2)
        codes = online.cc.encode(residual[0])
    codes[0] = 0
    return codes


def test_encode_matches_a_direct_computation(online: SimpleNamespace) -> None:
    ids = online.pair.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    codes = direct_codes(online, ids)
    chosen = codes[1:].max(0).values.topk(3).indices.tolist()  # latents that fire on this text
    response = online.client.post("/api/encode", json={"text": TEXT, "latents": chosen})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_ids"] == ids[0].tolist()
    assert body["tokens"] == [online.pair.tokenizer.decode([i]) for i in ids[0].tolist()]
    assert body["top_latents"][0] == []  # BOS is never encoded
    for position, top in enumerate(body["top_latents"]):
        values, where = codes[position].topk(5)
        assert [j for j, _ in top] == [j for j, v in zip(where.tolist(), values.tolist()) if v > 0]
    for j in chosen:
        torch.testing.assert_close(torch.tensor(body["latents"][str(j)]), codes[:, j], rtol=1e-5, atol=1e-6)
        assert max(body["latents"][str(j)]) > 0


def test_chat_turns_get_the_template_one_bos_and_a_generation_prompt(online: SimpleNamespace) -> None:
    messages = [{"role": "user", "content": "Hi <b>there</b>"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "How are you?"}]
    response = online.client.post("/api/encode", json={"messages": messages})
    assert response.status_code == 200, response.text
    tokenizer = online.pair.tokenizer
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = tokenizer(rendered.removeprefix(tokenizer.bos_token))["input_ids"]
    ids = response.json()["token_ids"]
    assert ids == expected and ids.count(tokenizer.bos_token_id) == 1
    assert "".join(response.json()["tokens"]).endswith("<start_of_turn>model\n")


def test_intervention_kl_matches_the_unchunked_reference(online: SimpleNamespace) -> None:
    ids = online.pair.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    codes = direct_codes(online, ids)
    j = int(codes[-1].argmax())  # the strongest latent at the last token
    response = online.client.post("/api/intervene", json={"text": TEXT, "latent": j, "model": "base", "mode": "ablate"})
    assert response.status_code == 200, response.text
    body = response.json()
    mask = torch.ones_like(ids)
    decoder = online.cc.decoder(normalised=False)[j].detach()
    with torch.no_grad():
        clean = next_token_logprobs(online.pair.base, online.pair.layer, ids, mask, lambda h: h)[0, -1]
        ablated = next_token_logprobs(online.pair.base, online.pair.layer, ids, mask,
                                      lambda h: h - codes[:, j, None] * decoder[0])[0, -1]
    expected = float(kl_per_position(clean, ablated))
    assert expected > 0 and body["models"]["base"]["kl"] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert body["models"]["chat"] == {**body["models"]["chat"], "edited": False, "kl": 0.0}
    assert body["models"]["chat"]["before"] == body["models"]["chat"]["after"]
    top = clean.exp().topk(6)
    assert [p for _, p in body["models"]["base"]["before"]] == pytest.approx(top.values.tolist(), rel=1e-4)
    assert body["fired_positions"] == int((codes[:, j] > 0).sum())
    # Scaling by 1 changes nothing, in both models.
    same = online.client.post("/api/intervene", json={"text": TEXT, "latent": j, "model": "both", "mode": "scale",
                                                      "factor": 1.0}).json()
    assert same["models"]["base"]["kl"] == same["models"]["chat"]["kl"] == 0.0
    assert same["models"]["chat"]["edited"] and same["models"]["base"]["edited"]


@pytest.mark.parametrize(
    ("route", "body", "status", "message"),
    [
        ("/api/encode", {"text": "the cat " * 40}, 422, "limit is 48 (dashboard.server.max_prompt_tokens)"),
        ("/api/encode", {"text": "x" * 3000}, 422, "limit is 1000 (dashboard.server.max_text_chars)"),
        ("/api/encode", {"text": "y" * 5000}, 413, "over 4096 bytes (dashboard.server.max_request_bytes)"),
        ("/api/encode", {"text": "a", "messages": [{"role": "user", "content": "b"}]}, 422, "exactly one of"),
        ("/api/encode", {"messages": [{"role": "robot", "content": "b"}]}, 422, "unknown role 'robot'"),
        ("/api/encode", {"messages": [{"role": "user", "content": "a"}] * 2}, 422, "chat template refused"),
        ("/api/encode", {"messages": [{"role": "user", "content": "a"}] * 5}, 422, "give 1 to 4"),
        ("/api/encode", {"text": "hi", "latents": [1, 2, 3, 4]}, 422, "limit is 3"),
        ("/api/encode", {"text": "hi", "latents": [128]}, 422, "latents 0..127"),
        ("/api/encode", {"text": "hi", "path": "/etc/passwd"}, 422, "extra"),
        ("/api/intervene", {"text": "hi", "latent": 1, "mode": "scale", "factor": 1e6}, 422, "at most 100"),
        ("/api/intervene", {"text": "hi", "latent": 1, "model": "gpt"}, 422, "base"),
    ],
)
def test_refusals_name_the_limit(online: SimpleNamespace, route: str, body: dict, status: int, message: str) -> None:
    response = online.client.post(route, json=body)
    assert response.status_code == status
    assert message in response.text


def test_oversized_body_is_refused_whatever_its_declared_length(online: SimpleNamespace) -> None:
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    response = online.client.post("/api/encode", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_serves_only_the_dashboard_files(online: SimpleNamespace, tiny_run: Path) -> None:
    client = online.client
    index = client.get("/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert index.text == (tiny_run / "dashboard" / "index.html").read_text()
    assert client.get("/data/meta.js").text.startswith('ccDashboard.receive("meta",')
    assert client.get("/api/info").json()["n_latents"] == 128
    for path in ("/max_activation_examples.db", "/../config.json", "/%2e%2e/model.safetensors", "/..%2fREADME.md",
                 "/data/../../model.safetensors", "//etc/passwd", "/data/missing.js"):
        assert client.get(path).status_code == 404, path


def test_an_l1_crosscoder_is_served_with_its_relu_codes(online: SimpleNamespace, tiny_run: Path) -> None:
    """The online app takes an L1 crosscoder (no threshold: every positive code, token by token)."""
    import copy

    l1 = copy.deepcopy(online.cc)
    l1.sparsity, l1.k = "l1", None
    l1.threshold.fill_(-1.0)  # an L1 crosscoder is never calibrated, and needs no calibration
    client = TestClient(create_app(OnlineSession(l1, online.pair, LIMITS), tiny_run / "dashboard"))
    ids = online.pair.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        models = (online.pair.base, online.pair.chat)
        residual = torch.stack([residual_at(m, online.pair.layer, input_ids=ids) for m in models], dim=2)[0]
        codes = torch.relu(l1.pre_acts(residual))  # the L1 codes written out: no selection
    codes[0] = 0
    chosen = codes[1:].max(0).values.topk(3).indices.tolist()
    body = client.post("/api/encode", json={"text": TEXT, "latents": chosen}).json()
    assert body["top_latents"][0] == []
    for position, top in enumerate(body["top_latents"][1:], start=1):
        values, where = codes[position].topk(5)
        assert [j for j, _ in top] == [j for j, v in zip(where.tolist(), values.tolist()) if v > 0]
    for j in chosen:
        torch.testing.assert_close(torch.tensor(body["latents"][str(j)]), codes[:, j], rtol=1e-5, atol=1e-6)
