"""Core-Cocktail's merge: M = alpha * M1 + (1 - alpha) * M0 tensor by tensor, a per-module alpha where the
longest prefix wins, mergekit's `linear` arithmetic, and `fac merge` on real checkpoint folders."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from fac.cli import main
from fac.model import load_checkpoint
from fac.train.merge import alpha_for, linear_merge
from train_fixtures import one_thread, save_random_drsr, tiny_world  # noqa: F401 (fixtures)

ALPHAS = [0.0, 0.3, 0.5, 0.7, 1.0]
F32_EPS = torch.finfo(torch.float32).eps
SPEECH_EMBEDDING, TIED_SRH_HEAD = "audio_tower.embed_tokens.weight", "audio_invert_tower.lm_head.weight"


def random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "language_model.model.embed_tokens.weight": torch.randn(11, 6, generator=g),
        "language_model.model.layers.0.mlp.up_proj.weight": torch.randn(8, 6, generator=g),
        "language_model.lm_head.weight": torch.randn(11, 6, generator=g),
        "audio_tower.embed_tokens.weight": torch.randn(20, 6, generator=g),
        "audio_invert_tower.pre_matching.bias": torch.randn(30, generator=g),
    }


def mergekit_linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """mergekit's `linear` method (mergekit/merge_methods/linear.py, LinearMergeTask.execute), written anew:
    the weights in the tensors' dtype, sum_i(w_i * T_i), divided by sum_i(w_i) when `normalize` (the default)."""
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))
    result = (w * stacked).sum(dim=0)
    return result / w.sum(dim=0) if normalize else result


# ------------------------------------------------------------------------------------------- linear_merge


@pytest.mark.parametrize("alpha", ALPHAS)
def test_linear_merge_is_alpha_other_plus_one_minus_alpha_base(alpha):
    base, other = random_state(0), random_state(1)
    merged = linear_merge(base, other, alpha)
    assert merged.keys() == base.keys()
    for name in base:
        expected = (alpha * other[name].double() + (1 - alpha) * base[name].double()).float()
        assert merged[name].dtype == torch.float32
        assert torch.equal(merged[name], expected), name


def test_linear_merge_with_alpha_zero_is_the_base_exactly():
    base, other = random_state(0), random_state(1)
    merged = linear_merge(base, other, 0.0)
    assert all(torch.equal(merged[n], base[n]) for n in base)


def test_linear_merge_with_alpha_one_is_the_other_exactly():
    base, other = random_state(0), random_state(1)
    merged = linear_merge(base, other, 1.0)
    assert all(torch.equal(merged[n], other[n]) for n in base)


def test_linear_merge_takes_integer_tensors_from_the_base():
    base, other = {"ids": torch.arange(5)}, {"ids": torch.arange(5) * 7}
    assert torch.equal(linear_merge(base, other, 0.5)["ids"], torch.arange(5))


def test_per_module_alpha_longest_prefix_wins_then_the_global_alpha():
    per_module = {"language_model": 0.2, "language_model.lm_head": 0.9, "audio_tower": 1.0}
    expected = {
        "language_model.model.embed_tokens.weight": 0.2,
        "language_model.model.layers.0.mlp.up_proj.weight": 0.2,
        "language_model.lm_head.weight": 0.9,
        "audio_tower.embed_tokens.weight": 1.0,
        "audio_invert_tower.pre_matching.bias": 0.5,
    }
    for per in (per_module, dict(reversed(per_module.items()))):  # the order of the mapping does not matter
        assert {n: alpha_for(n, 0.5, per) for n in expected} == expected
    base, other = random_state(0), random_state(1)
    merged = linear_merge(base, other, 0.5, per_module)
    for name, a in expected.items():
        assert torch.equal(merged[name], (a * other[name].double() + (1 - a) * base[name].double()).float()), name


def test_merge_of_state_dicts_with_different_tensors_names_them():
    base, other = random_state(0), random_state(1)
    other["audio_tower.extra.weight"] = torch.zeros(2)
    del other["audio_invert_tower.pre_matching.bias"]
    with pytest.raises(ValueError, match="differ") as err:
        linear_merge(base, other, 0.5)
    assert "audio_tower.extra.weight" in str(err.value)
    assert "audio_invert_tower.pre_matching.bias" in str(err.value)


def test_merge_of_tensors_with_different_shapes_names_the_tensor_and_both_shapes():
    base, other = random_state(0), random_state(1)
    other["language_model.lm_head.weight"] = torch.zeros(6, 11)
    with pytest.raises(ValueError, match=r"language_model\.lm_head\.weight.*\[11, 6\].*\[6, 11\]"):
        linear_merge(base, other, 0.5)


# ------------------------------------------------------------------------------------------- mergekit


@pytest.mark.parametrize("alpha", ALPHAS)
def test_linear_merge_equals_mergekit_linear_with_weights_alpha_and_one_minus_alpha(alpha):
    base, other = random_state(0), random_state(1)
    merged = linear_merge(base, other, alpha)
    for name in base:
        theirs = mergekit_linear([other[name], base[name]], [alpha, 1 - alpha])
        # mergekit rounds in float32 at every step, linear_merge once: equal to a few float32 ulps.
        torch.testing.assert_close(merged[name], theirs, rtol=4 * F32_EPS, atol=4 * F32_EPS)


@pytest.mark.parametrize("weights,alpha", [((0.6, 0.6), 0.5), ((0.9, 0.3), 0.75), ((2.0, 8.0), 0.2)])
def test_linear_merge_equals_mergekit_linear_with_unnormalised_weights(weights, alpha):
    base, other = random_state(0), random_state(1)
    merged = linear_merge(base, other, alpha)
    for name in base:
        theirs = mergekit_linear([other[name], base[name]], list(weights))
        torch.testing.assert_close(merged[name], theirs, rtol=4 * F32_EPS, atol=4 * F32_EPS)


# ------------------------------------------------------------------------------------------- fac merge


@pytest.fixture(scope="module")
def checkpoints(tiny_world, tmp_path_factory):
    """Two tiny DRSR checkpoints of one config (different weights), and one of another config."""
    base = tmp_path_factory.mktemp("merge")
    save_random_drsr(tiny_world, base / "m0", seed=1)
    save_random_drsr(tiny_world, base / "m1", seed=2)
    other_geometry = json.loads(json.dumps(tiny_world.model_params))
    other_geometry["srh"]["intermediate_size"] = 48
    save_random_drsr(tiny_world, base / "other_config", seed=3, model_params=other_geometry)
    return base


def test_fac_merge_writes_a_loadable_checkpoint_holding_the_merge(checkpoints, tmp_path):
    out = tmp_path / "merged"
    rc = main(["merge", "--base", str(checkpoints / "m0"), "--other", str(checkpoints / "m1"), "--alpha", "0.3",
               "--out", str(out)])
    assert rc == 0
    expected = linear_merge(load_checkpoint(checkpoints / "m0").state_dict(),
                            load_checkpoint(checkpoints / "m1").state_dict(), 0.3)
    merged = load_checkpoint(out).state_dict()
    assert merged.keys() == expected.keys()
    assert [n for n in expected if not torch.equal(merged[n], expected[n])] == []


def test_fac_merge_output_carries_the_base_tokenizer(checkpoints, tmp_path):
    out = tmp_path / "merged"
    main(["merge", "--base", str(checkpoints / "m0"), "--other", str(checkpoints / "m1"), "--alpha", "0.5",
          "--out", str(out)])
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(checkpoints / "m0")
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.chat_template == theirs.chat_template
    assert ours.eos_token == "<|im_end|>" and ours.pad_token == "<|endoftext|>"


def _merge_srh_from_other(checkpoints, out):
    rc = main(["merge", "--base", str(checkpoints / "m0"), "--other", str(checkpoints / "m1"), "--alpha", "0.0",
               "--per-module", "audio_invert_tower=1.0", "--out", str(out)])
    assert rc == 0
    m0, m1 = load_checkpoint(checkpoints / "m0").state_dict(), load_checkpoint(checkpoints / "m1").state_dict()
    return m0, m1, load_checkpoint(out).state_dict()


def test_fac_merge_per_module_alpha_takes_the_srh_from_the_other_model(checkpoints, tmp_path):
    m0, m1, merged = _merge_srh_from_other(checkpoints, tmp_path / "merged")
    srh = [n for n in merged if n.startswith("audio_invert_tower.") and n != TIED_SRH_HEAD]
    assert srh and [n for n in srh if not torch.equal(merged[n], m1[n])] == []
    rest = [n for n in merged if n.startswith(("language_model.", "continuous_audio_tower."))]
    assert rest and [n for n in rest if not torch.equal(merged[n], m0[n])] == []


def test_fac_merge_per_module_alpha_of_the_srh_leaves_the_tied_speech_embedding_at_its_own_alpha(
        checkpoints, tmp_path):
    # The SRH head is the speech-token embedding (tied; stored once, as audio_tower.embed_tokens.weight).
    # An alpha given for audio_invert_tower must not silently overwrite audio_tower's own tensor.
    m0, _, merged = _merge_srh_from_other(checkpoints, tmp_path / "merged")
    assert torch.equal(merged[SPEECH_EMBEDDING], m0[SPEECH_EMBEDDING])


def test_fac_merge_refuses_checkpoints_of_different_configs(checkpoints, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["merge", "--base", str(checkpoints / "m0"), "--other", str(checkpoints / "other_config"),
               "--alpha", "0.5", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "fac merge: error:" in err and "configs differ" in err
    assert str(checkpoints / "m0") in err and str(checkpoints / "other_config") in err
    assert not out.exists()
