"""CrossCoder (plain nn.Module): BatchTopK, threshold encoding, folding, save/load, bad input."""

import json

import pytest
import torch

from crosscoder_pl import CrossCoder


def _cc(seed: int = 0, **kw) -> CrossCoder:
    torch.manual_seed(seed)
    return CrossCoder(d_model=16, n_latents=64, k=4, **kw)


def test_batch_topk_keeps_exactly_k_times_batch() -> None:
    cc = _cc().train()
    x = torch.randn(37, 2, 16)
    codes = cc.encode(x)
    assert codes.shape == (37, 64)
    assert int((codes > 0).sum()) == 4 * 37
    # the kept entries are the highest scores of the whole batch, with their unscaled f values
    f = cc.pre_acts(x)
    kept_scores = cc.scores(f)[codes > 0]
    dropped_scores = cc.scores(f)[codes == 0]
    assert kept_scores.min() >= dropped_scores.max()
    assert torch.equal(codes[codes > 0], f[codes > 0])


def test_batch_topk_over_leading_dims_matches_flat() -> None:
    cc = _cc().train()
    x = torch.randn(4, 5, 2, 16)
    assert torch.equal(cc.encode(x).reshape(20, 64), cc.encode(x.reshape(20, 2, 16)))


def test_eval_threshold_encodes_tokens_independently() -> None:
    cc = _cc().eval()
    x = torch.randn(9, 2, 16)
    f = cc.pre_acts(x)
    scores = cc.scores(f).detach()
    positive = scores[scores > 0].sort().values
    half = positive.numel() // 2
    # about half the positive entries kept; midway between two scores, so that no score sits on the threshold,
    # where the last bit a one-row matmul may change would decide
    theta = float((positive[half - 1] + positive[half]) / 2)
    cc.threshold.fill_(theta)
    batch = cc.encode(x)
    alone = torch.cat([cc.encode(x[i : i + 1]) for i in range(9)])
    torch.testing.assert_close(batch, alone)  # one-row matmuls may differ from the batched one in the last bit
    kept = scores > theta
    assert 0 < int(kept.sum()) < int((scores > 0).sum())  # the threshold does select
    assert torch.equal(batch, f * kept)
    assert torch.equal(batch[kept], f[kept]) and not batch[~kept].any()
    # an entry whose score equals the threshold exactly is dropped (strictly greater is kept)
    at = scores[scores > 0].min()
    cc.threshold.fill_(float(at))
    assert not cc.encode(x)[scores == at].any()


def test_uncalibrated_eval_falls_back_to_batch_topk_with_warning() -> None:
    cc = _cc().eval()
    with pytest.warns(UserWarning, match="threshold not calibrated"):
        codes = cc.encode(torch.randn(10, 2, 16))
    assert int((codes > 0).sum()) == 40


@pytest.mark.parametrize("centred", [False, True])
def test_fold_gives_same_reconstruction_on_raw_inputs(centred: bool) -> None:
    means = torch.randn(2, 16) * torch.tensor([[30.0], [0.5]]) if centred else None
    cc = _cc(scales=[0.5, 20.0], means=means).eval()
    cc.threshold.fill_(0.01)
    with torch.no_grad():
        cc.b_dec.normal_()
    x = torch.randn(50, 2, 16) * torch.tensor([2.0, 0.05])[:, None] + cc.means
    if centred:  # the unfolded crosscoder reads (x - mean) * scale, and adds the mean back after the decoder
        torch.testing.assert_close(cc.normalise(x), (x - means) * torch.tensor([0.5, 20.0])[:, None])
        codes = cc.encode(x)
        torch.testing.assert_close(cc.decode(codes), cc.decode(codes, normalised=True) / cc.scales[:, None] + means)
    folded = cc.fold()
    assert torch.equal(folded.means, cc.means)  # the record of what the folded biases hold
    assert folded.folded and not cc.folded
    torch.testing.assert_close(folded.encode(x), cc.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded(x), cc(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded.decoder_norms(), cc.decoder_norms(), rtol=1e-5, atol=1e-7)
    # folding twice is a no-op
    assert torch.equal(folded.fold().W_enc, folded.W_enc)


def test_save_load_roundtrip_is_bit_exact(tmp_path) -> None:
    cc = _cc(scales=[0.5, 20.0], means=torch.randn(2, 16) * 5, metadata={"layer": 3}).eval()
    cc.threshold.fill_(0.02)
    cc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["k"] == 4 and config["threshold"] == pytest.approx(0.02) and config["folded"] and config["centred"]
    assert config["scales"] == pytest.approx([0.5, 20.0]) and config["metadata"] == {"layer": 3}
    loaded = CrossCoder.from_pretrained(tmp_path)
    expected = cc.fold().state_dict()
    got = loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    x = torch.randn(20, 2, 16)
    assert torch.equal(loaded(x), cc.fold().eval()(x))
    # a second save of the loaded model writes identical bytes
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 16, "n_latents": 8, "k": 9}, "k=9 is larger than the dictionary"),
        ({"d_model": 0, "n_latents": 8, "k": 1}, "d_model must be a positive integer"),
        ({"d_model": 4, "n_latents": 8, "k": 1, "scales": [1.0, -1.0]}, "finite positive"),
    ],
)
def test_bad_construction_names_the_value(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CrossCoder(**kwargs)


def test_bad_input_shapes_and_dtypes() -> None:
    cc = _cc()
    with pytest.raises(ValueError, match=r"got shape \(3, 16\)"):
        cc.encode(torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, 16\], got shape \(3, 2, 15\)"):
        cc.encode(torch.randn(3, 2, 15))
    with pytest.raises(TypeError, match=r"a floating-point tensor \[\.\.\., 2, 16\], got tensor of dtype torch.int64 "
                                        r"and shape \(3, 2, 16\)"):
        cc.encode(torch.ones(3, 2, 16, dtype=torch.long))
    with pytest.raises(TypeError, match=r"\[\.\.\., 2, 16\], got list"):
        cc.encode([[0.0] * 16] * 2)


def test_from_pretrained_missing_dir_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no crosscoder at"):
        CrossCoder.from_pretrained(tmp_path / "nope")


def test_a_hub_id_the_hub_refuses_is_an_error_naming_the_repo_and_the_answer(monkeypatch) -> None:
    """Not in the local cache, the hub reached and answering 404: one error with the repo, the answer and the way
    to run offline, not the hub client's own exception (no network: the hub client is replaced)."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    from crosscoder_pl import network

    def not_cached(repo_id, **kwargs):
        assert kwargs.get("local_files_only"), "downloaded although the hub refused the repo"
        raise FileNotFoundError(repo_id)

    def refused(repo_id, timeout):
        request = httpx2.Request("GET", f"http://hub.invalid/api/models/{repo_id}")
        raise HfHubHTTPError("404 Repository Not Found", response=httpx2.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    monkeypatch.setattr(huggingface_hub, "model_info", refused)
    monkeypatch.setattr(network, "hub_offline", lambda: False)
    with pytest.raises(ConnectionError, match=r"could not load the crosscoder 'someone/missing'.*"
                                              r"HfHubHTTPError: 404 Repository Not Found.*HF_HUB_OFFLINE=1"):
        CrossCoder.from_pretrained("someone/missing")


def test_decoder_in_both_spaces_folded_or_not() -> None:
    cc = _cc(scales=[0.5, 20.0])
    folded = cc.fold()
    for normalised in (True, False):
        torch.testing.assert_close(folded.decoder(normalised), cc.decoder(normalised))
    torch.testing.assert_close(cc.decoder(normalised=False), cc.W_dec / torch.tensor([0.5, 20.0])[:, None])


def test_fresh_crosscoder_init_and_uncalibrated_threshold(tmp_path) -> None:
    for dec_init_norm in (0.08, 0.5):
        torch.manual_seed(0)
        cc = CrossCoder(d_model=16, n_latents=64, k=4, dec_init_norm=dec_init_norm)
        # every decoder vector (one per latent and model) has the init norm; the encoder is its transpose
        torch.testing.assert_close(cc.W_dec.norm(dim=-1), torch.full((64, 2), dec_init_norm))
        assert torch.equal(cc.W_enc, cc.W_dec.permute(1, 2, 0))
        assert not cc.b_enc.any() and not cc.b_dec.any()
    assert float(cc.threshold) == -1.0 and not cc.threshold_calibrated
    cc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["threshold"] == -1.0  # "not calibrated" in the file


def test_threshold_zero_is_calibrated() -> None:
    cc = _cc().eval()
    cc.threshold.fill_(0.0)
    assert cc.threshold_calibrated
    x = torch.randn(5, 2, 16)
    f = cc.pre_acts(x)
    assert torch.equal(cc.encode(x), f * (cc.scores(f) > 0))  # threshold encoding, not BatchTopK


@pytest.mark.parametrize("scales", [[1.0], [1.0, 1.0, 1.0], [[1.0, 1.0]], [1.0, 0.0], [1.0, float("inf")],
                                    [float("nan"), 1.0]])
def test_scales_must_be_one_finite_positive_number_per_model(scales) -> None:
    with pytest.raises(ValueError, match=r"scales must be 2 finite positive numbers, got "):
        CrossCoder(d_model=4, n_latents=8, k=1, scales=scales)


def test_k_may_equal_the_dictionary_size() -> None:
    cc = CrossCoder(d_model=4, n_latents=8, k=8).train()
    x = torch.randn(3, 2, 4)
    f = cc.pre_acts(x)
    assert torch.equal(cc.encode(x), f)  # every entry kept


def test_one_token_without_a_batch_dimension() -> None:
    """Activations ``[..., 2, d_model]`` with no leading dimension: one token ``[2, d_model]``."""
    cc = _cc().eval()
    cc.threshold.fill_(0.01)
    x = torch.randn(2, 16)
    codes = cc.encode(x)
    assert codes.shape == (64,)
    assert torch.equal(codes, cc.encode(x[None])[0])
    assert cc.decode(codes).shape == (2, 16)
    torch.testing.assert_close(cc(x), cc(x[None])[0])


def test_decode_over_leading_dims_matches_flat() -> None:
    cc = _cc(scales=[0.5, 2.0])
    with torch.no_grad():
        cc.b_dec.normal_()
    codes = torch.relu(torch.randn(3, 5, 64))
    x_hat = cc.decode(codes)
    assert x_hat.shape == (3, 5, 2, 16)
    torch.testing.assert_close(x_hat, cc.decode(codes.reshape(15, 64)).reshape(3, 5, 2, 16))
    direct = torch.stack([codes @ cc.W_dec[:, m] + cc.b_dec[m] for m in range(2)], dim=-2) / torch.tensor([0.5, 2.0])[:, None]
    torch.testing.assert_close(x_hat, direct)


def test_uncalibrated_warning_only_in_eval_once_and_at_the_caller() -> None:
    import warnings

    cc = _cc().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cc.encode(torch.randn(10, 2, 16))  # training mode: BatchTopK is the method, nothing to warn about
    cc.eval()
    with pytest.warns(UserWarning, match="threshold not calibrated") as record:
        cc.encode(torch.randn(10, 2, 16))
    assert len(record) == 1 and record[0].filename == __file__  # stacklevel: the line that called encode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cc.encode(torch.randn(10, 2, 16))  # once per crosscoder


def test_save_creates_missing_parents_and_writes_readable_json(tmp_path) -> None:
    cc = _cc(metadata={"layer": 3})
    target = tmp_path / "runs" / "demo" / "crosscoder"
    cc.save_pretrained(target)
    text = (target / "config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2) + "\n"  # two-space indent, one key a line, final newline
    assert config["architecture"] == "BatchTopKCrossCoder" and config["model_order"] == ["base", "chat"]
    assert torch.equal(CrossCoder.from_pretrained(target).W_dec, cc.fold().W_dec)


@pytest.mark.parametrize("architecture", ["JumpReLUCrossCoder", "AutoEncoder"])
def test_from_pretrained_refuses_another_architecture(tmp_path, architecture) -> None:
    _cc().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"] = architecture
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: architecture '{architecture}' is not one of \\['BatchTopKCrossCoder', 'L1CrossCoder'\\]"):
        CrossCoder.from_pretrained(str(tmp_path))


def test_a_crosscoder_saved_before_centring_loads_with_zero_means(tmp_path) -> None:
    """Artifacts written before the means existed have no ``means`` tensor: nothing was subtracted, so they load
    with zero means and the same outputs."""
    from safetensors.torch import load_file, save_file

    cc = _cc(scales=[0.5, 2.0]).eval()
    cc.threshold.fill_(0.01)
    cc.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["means"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = CrossCoder.from_pretrained(tmp_path)
    assert torch.equal(loaded.means, torch.zeros(2, 16))
    x = torch.randn(20, 2, 16)
    assert torch.equal(loaded(x), cc.fold().eval()(x))


@pytest.mark.parametrize("means", [torch.zeros(2, 15), torch.zeros(1, 16), torch.zeros(3, 16), torch.zeros(2, 17),
                                   torch.full((2, 16), float("nan"))])
def test_means_must_be_finite_and_one_vector_per_model(means) -> None:
    with pytest.raises(ValueError, match=r"means must be a finite \[2, 16\] tensor"):
        _cc(means=means)


def test_from_pretrained_refuses_missing_or_extra_tensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    _cc().save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for edit in ("missing", "extra"):
        broken = dict(tensors)
        if edit == "missing":
            del broken["b_enc"]
        else:
            broken["W_other"] = torch.zeros(3)
        save_file(broken, str(tmp_path / "model.safetensors"))
        with pytest.raises(RuntimeError, match="b_enc" if edit == "missing" else "W_other"):
            CrossCoder.from_pretrained(tmp_path)


def test_from_pretrained_tries_the_hub_only_for_an_absent_owner_slash_name(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    saved = _cc().save_pretrained(tmp_path / "saved")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, **kwargs):  # the local cache answers first
        calls.append((repo_id, allow_patterns, kwargs.get("local_files_only")))
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    loaded = CrossCoder.from_pretrained("someone/crosscoder")
    assert calls == [("someone/crosscoder", ["config.json", "model.safetensors"], True)]
    assert torch.equal(loaded.W_enc, _cc().fold().W_enc)
    # a local directory named like a repo id is read from disk; other absent paths are a clear error
    _cc().save_pretrained(tmp_path / "local" / "cc")
    CrossCoder.from_pretrained("local/cc")
    for absent in ("nope", "a/b/c", tmp_path / "x" / "y"):
        with pytest.raises(FileNotFoundError, match="no crosscoder at"):
            CrossCoder.from_pretrained(absent)
    assert len(calls) == 1


def test_a_hub_id_not_in_the_cache_is_refused_offline_and_probed_online(tmp_path, monkeypatch) -> None:
    """Not in the local cache: in offline mode a FileNotFoundError naming offline mode, without any request; online,
    one probe (model_info) whose failure is a ConnectionError naming HF_HUB_ETAG_TIMEOUT."""
    import huggingface_hub
    from huggingface_hub import constants

    def not_cached(repo_id, allow_patterns, **kwargs):
        assert kwargs.get("local_files_only") is True  # the download itself is never reached here
        raise FileNotFoundError("not in the cache")

    probes = []

    def silent_hub(repo_id, timeout=None):
        probes.append((repo_id, timeout))
        raise TimeoutError("no answer")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    monkeypatch.setattr(huggingface_hub, "model_info", silent_hub)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="offline mode is on"):
        CrossCoder.from_pretrained("someone/crosscoder")
    assert probes == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # tests/conftest.py sets it; read at call time too
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ConnectionError, match="no usable answer within HF_HUB_ETAG_TIMEOUT"):
        CrossCoder.from_pretrained("someone/crosscoder")
    assert probes == [("someone/crosscoder", constants.HF_HUB_ETAG_TIMEOUT)]


def test_a_missing_artifact_names_the_latest_copy_set_aside(tmp_path) -> None:
    """An interrupted rewrite leaves complete copies aside (``.NAME.replaced-*``): the error names the last by name."""
    for n in (1, 2, 3):
        (tmp_path / f".cc.replaced-{n}").mkdir()
    with pytest.raises(FileNotFoundError, match=r"set aside by an interrupted rewrite is at .*\.cc\.replaced-3: rename"):
        CrossCoder.from_pretrained(tmp_path / "cc")
    with pytest.raises(FileNotFoundError, match="no crosscoder at") as err:
        CrossCoder.from_pretrained(tmp_path / "other")
    assert "set aside" not in str(err.value)
