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
    cc.threshold.fill_(0.05)
    x = torch.randn(9, 2, 16)
    batch = cc.encode(x)
    alone = torch.cat([cc.encode(x[i : i + 1]) for i in range(9)])
    assert torch.equal(batch, alone)
    f = cc.pre_acts(x)
    assert torch.equal(batch, f * (cc.scores(f) > 0.05))


def test_uncalibrated_eval_falls_back_to_batch_topk_with_warning() -> None:
    cc = _cc().eval()
    with pytest.warns(UserWarning, match="threshold not calibrated"):
        codes = cc.encode(torch.randn(10, 2, 16))
    assert int((codes > 0).sum()) == 40


def test_fold_gives_same_reconstruction_on_raw_inputs() -> None:
    cc = _cc(scales=[0.5, 20.0]).eval()
    cc.threshold.fill_(0.01)
    with torch.no_grad():
        cc.b_dec.normal_()
    x = torch.randn(50, 2, 16) * torch.tensor([2.0, 0.05])[:, None]
    folded = cc.fold()
    assert folded.folded and not cc.folded
    torch.testing.assert_close(folded.encode(x), cc.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded(x), cc(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded.decoder_norms(), cc.decoder_norms(), rtol=1e-5, atol=1e-7)
    # folding twice is a no-op
    assert torch.equal(folded.fold().W_enc, folded.W_enc)


def test_save_load_roundtrip_is_bit_exact(tmp_path) -> None:
    cc = _cc(scales=[0.5, 20.0], metadata={"layer": 3}).eval()
    cc.threshold.fill_(0.02)
    cc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["k"] == 4 and config["threshold"] == pytest.approx(0.02) and config["folded"]
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
    with pytest.raises(TypeError, match="torch.int64"):
        cc.encode(torch.ones(3, 2, 16, dtype=torch.long))


def test_from_pretrained_missing_dir_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no crosscoder at"):
        CrossCoder.from_pretrained(tmp_path / "nope")


def test_decoder_in_both_spaces_folded_or_not() -> None:
    cc = _cc(scales=[0.5, 20.0])
    folded = cc.fold()
    for normalised in (True, False):
        torch.testing.assert_close(folded.decoder(normalised), cc.decoder(normalised))
    torch.testing.assert_close(cc.decoder(normalised=False), cc.W_dec / torch.tensor([0.5, 20.0])[:, None])
