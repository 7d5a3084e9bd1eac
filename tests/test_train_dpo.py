"""DPO: the sigmoid loss equals TRL's on the same log-probs; sequence log-probs score the targets the training
losses score (text and speech) but the fillers; preference files are checked; one DPO step moves the policy."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import CONFORMANCE_DIR
from fac.train.dpo import dpo_loss, read_pairs, sequence_logps


def trl_sigmoid_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """TRL's own DPOTrainer._compute_loss (loss_type sigmoid, precomputed reference log-probs), called on a
    stand-in trainer and model whose per-token log-probs sum to the given sequence log-probs."""
    from trl import DPOTrainer

    n = chosen.shape[0]
    logps = torch.cat([chosen, rejected])[:, None]  # [2N, 1]: one completion token per row

    def model(**kwargs):
        return SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                               is_top1=torch.zeros_like(logps, dtype=torch.bool))

    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
                           label_smoothing=0.0, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, 2, dtype=torch.long), "attention_mask": torch.ones(2 * n, 2),
              "completion_mask": torch.ones(2 * n, 2), "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_loss_equals_trl_on_the_same_log_probs(beta):
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6) * 5 - 20 for _ in range(4))
    ours, per_pair, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    theirs, metrics = trl_sigmoid_dpo_loss(pc, pr, rc, rr, beta)
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert abs(chosen.mean().item() - metrics["rewards/chosen"][0]) < 1e-6
    assert abs((chosen - rejected).mean().item() - metrics["rewards/margins"][0]) < 1e-6
    assert per_pair.shape == (6,)


def test_dimension_weights_scale_each_pairs_loss():
    pc, pr, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.zeros(2) - 4, torch.zeros(2) - 4
    _, per_pair, _, _ = dpo_loss(pc, pr, rc, rr, 0.2)
    weighted, _, _, _ = dpo_loss(pc, pr, rc, rr, 0.2, torch.tensor([2.0, 0.0]))
    assert torch.isclose(weighted, per_pair[0] * 2 / 2)
    # At the reference (policy == reference) every pair's loss is log 2.
    at_ref, _, _, _ = dpo_loss(rc, rr, rc, rr, 0.2)
    assert abs(at_ref.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6


def test_sequence_logps_score_the_training_losses_targets_but_the_fillers():
    """A reply's log-prob: the targets the training losses average (their per-target log-probs, read here from the
    logits, add up to the losses) but the text stream's `<|sil|>` and the speech delay's speech-bos codes, which a
    longer spoken reply has more of; `mean` divides by the targets counted."""
    conformance_dir = CONFORMANCE_DIR
    from safetensors.torch import load_file

    from fac.model import FunAudioChatForConditionalGeneration

    model = FunAudioChatForConditionalGeneration.from_pretrained(conformance_dir).eval()
    inputs = {k[len("train."):]: v for k, v in load_file(conformance_dir / "inputs.safetensors").items()
              if k.startswith("train.")}
    with torch.no_grad():
        out = model(**inputs)
        total = sequence_logps(model, dict(inputs))
        mean = sequence_logps(model, dict(inputs), "mean")
    g = model.config.audio_config.group_size
    text_labels = out.text_labels[:, 1:]
    speech_labels = torch.nn.functional.pad(out.speech_labels[:, g:], (0, g), value=-100)
    text_lp = out.text_logits[:, :-1].log_softmax(-1).gather(2, text_labels.clamp(min=0)[..., None])[..., 0]
    speech_lp = out.speech_logits.log_softmax(-1).gather(2, speech_labels.clamp(min=0)[..., None])[..., 0]
    text_scored, speech_scored = text_labels != -100, speech_labels != -100
    # every scored target: mean CE x count = -summed log-prob, for each stream
    assert torch.isclose(text_lp[text_scored].sum(), -out.text_loss * text_scored.sum(), rtol=1e-5)
    assert torch.isclose(speech_lp[speech_scored].sum(), -out.speech_loss * speech_scored.sum(), rtol=1e-5)
    text_filler = text_labels == model.config.text_config.sil_index
    speech_filler = speech_labels == model.config.audio_config.bos_token_id
    assert text_filler.any() and speech_filler.any()  # the fixture's spoken replies have both
    text_kept, speech_kept = text_scored & ~text_filler, speech_scored & ~speech_filler
    expected = (text_lp * text_kept).sum(-1) + (speech_lp * speech_kept).sum(-1)
    assert torch.allclose(total, expected, rtol=1e-5)
    assert not torch.allclose(total, (text_lp * text_scored).sum(-1) + (speech_lp * speech_scored).sum(-1))
    assert torch.allclose(mean, expected / (text_kept.sum(-1) + speech_kept.sum(-1)), rtol=1e-5)
    with pytest.raises(ValueError, match="logps 'max'"):
        sequence_logps(model, dict(inputs), "max")


def test_preference_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with pytest.raises(FileNotFoundError, match="pairs.jsonl"):
        read_pairs(path)
    path.write_text('{"dimension": "robustness", "chosen": {"text": "cairo"}, "rejected": {"text": "paris"}}\n'
                    '{"dimension": "humour", "chosen": {"text": "a"}, "rejected": {"text": "b"}}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2"):
        read_pairs(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no preference pairs"):
        read_pairs(path)
