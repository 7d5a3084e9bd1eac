"""bench/bench_compute.py and bench/gpu_bench.py: the meta-device counts equal real CPU counts, the 8B LLM's FLOPs
follow its sequence length, and the GPU benchmark runs on the CPU at toy size."""
import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import bench_compute  # noqa: E402
import bench_grouping  # noqa: E402
import gpu_bench  # noqa: E402


@pytest.fixture(scope="module")
def tiny_counts(one_thread):
    """(config, batch, CPU counts, meta counts) of one training step of the tiny default on a 12 s conversation."""
    config, _ = bench_compute.geometry_config("tiny", 5)
    batch, _ = bench_compute.conversation(config, minutes=0.2, turns=2)
    torch.manual_seed(0)
    cpu_model = bench_compute.build_model(config, "cpu")
    cpu = bench_compute.measure_step(cpu_model, batch)
    meta = bench_compute.measure_step(bench_compute.build_model(config, "meta"), batch)
    return config, batch, cpu_model, cpu, meta


def test_meta_flops_equal_cpu_flops(tiny_counts):
    _, _, _, cpu, meta = tiny_counts
    assert meta["forward_flops"] == cpu["forward_flops"]
    assert meta["step_flops"] == cpu["step_flops"]
    assert cpu["step_flops"]["total"] > cpu["forward_flops"]["total"] > 0
    for name in ("mel_encoder", "llm", "srh"):  # every part of the model is counted, forward and backward
        assert cpu["forward_flops"][name] > 0 and cpu["backward_flops"][name] > 0


def test_meta_activation_bytes_equal_cpu_bytes(tiny_counts):
    _, batch, cpu_model, cpu, meta = tiny_counts
    assert meta["activation_bytes"] == cpu["activation_bytes"]
    # on the CPU, storages deduplicated by identity count what deduplicating by data pointer counts
    with bench_compute.flash_style_attention():
        by_pointer_mb = bench_grouping.saved_activation_mb(cpu_model, batch)
    assert by_pointer_mb == pytest.approx(cpu["activation_bytes"]["total"] / 2**20, rel=1e-9)


def _llm_forward_flops(config, seq: int) -> int:
    """Forward FLOPs of the Qwen3 LLM over `seq` positions from its sizes: the projections, the MLP and the text
    head (2 per multiply-add), and attention's two S x S products (4 * heads * head_dim * S^2 per layer)."""
    t = config.text_config
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer = t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size  # multiply-adds
    per_position = 2 * t.num_hidden_layers * per_layer
    per_position += 2 * t.hidden_size * t.vocab_size
    return seq * per_position + t.num_hidden_layers * 4 * q * seq**2


def test_8b_llm_flops_follow_the_sequence_length_and_srh_stays(one_thread):
    # forward only, and the user's audio as placeholder speech only (the mel encoder, the same for every k, is
    # covered above): the LLM and SRH lengths are those of the full conversation
    runs = {k: bench_compute.run_geometry("paper_8b", k, minutes=6, backward=False, user_features=False)
            for k in (1, 5)}
    config = {k: bench_compute.geometry_config("paper_8b", k)[0] for k in (1, 5)}
    seq = {k: runs[k]["llm_sequence_length"] for k in (1, 5)}
    assert seq[5] < seq[1] / 4  # speech positions are 5 x fewer, text positions stay
    llm = {k: runs[k]["forward_flops"]["llm"] for k in (1, 5)}
    for k in (1, 5):  # the rotary tables' small matmul is the only thing not in the formula
        assert llm[k] == pytest.approx(_llm_forward_flops(config[k], seq[k]), rel=1e-4)
    expected = _llm_forward_flops(config[5], seq[5]) / _llm_forward_flops(config[1], seq[1])
    assert llm[5] / llm[1] == pytest.approx(expected, rel=1e-4)
    assert (seq[5] / seq[1]) ** 2 < llm[5] / llm[1] < seq[5] / seq[1]  # linear terms + quadratic attention
    # The SRH runs at 25 Hz whatever k is: its length changes only by the text positions it ungroups k-fold
    # (+5% here), and its FLOPs (linear + quadratic in that length) by no more than that length implies.
    srh_len = {k: runs[k]["srh_sequence_length"] for k in (1, 5)}
    ratio = runs[5]["forward_flops"]["srh"] / runs[1]["forward_flops"]["srh"]
    assert srh_len[5] / srh_len[1] <= ratio <= (srh_len[5] / srh_len[1]) ** 2
    assert ratio == pytest.approx(1.0, abs=0.1)


def test_gpu_bench_runs_on_the_cpu_at_toy_size(tmp_path, one_thread):
    out = tmp_path / "gpu_bench.json"
    gpu_bench.main(["--device", "cpu", "--geometry", "tiny", "--precision", "fp32", "--skip-checks", "--steps", "2",
                    "--warmup", "1", "--peak-tflops", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    results = {r["group_size"]: r for r in record["results"]}
    assert set(results) == {1, 5}
    assert record["device"]["peak_flops"] == 2e12
    for r in results.values():
        assert r["llm_tokens_per_second"] > 0 and r["train_step_flops"] > 0 and len(r["step_seconds"]) == 2
        assert r["mfu"] == pytest.approx(r["train_step_flops"] / r["step_seconds_median"] / 2e12)
    assert results[5]["llm_sequence_length"] < results[1]["llm_sequence_length"]
    assert record["ratios"]["train_step_flops"] == pytest.approx(
        results[5]["train_step_flops"] / results[1]["train_step_flops"])
