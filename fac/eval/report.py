"""The experiment report: one self-contained HTML page (plots embedded as PNG data URIs).

Sections: the per-stage metrics table of the experiment, its ablation tables (when ablations.json is
there: merge alpha, DPO per dimension vs multi-task; and grouping k across the experiments under the same
results folder whose checkpoints use different k), the spoken answers (with a detokenizer: a few test questions
per set, each with its question audio, the reference answer's recording and, per stage, the text answer, what the
ASR scorer heard and the spoken answer as `<audio>` elements, and the mels of the spoken answers beside the
reference's), the loss curves of every trained stage (from the checkpoints' history.jsonl), DPO's reward margin
and accuracy, and a comparison with every other experiment found under the same results folder (their
metrics.json), as a table and a plot per headline metric. Sound is embedded as WAV data URIs: the page is one file.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fac import atomic  # noqa: E402

HEADLINE = ["spoken_qa_acc", "spoken_qa_acc_unseen_voices", "text_qa_acc", "speech_token_acc"]
TRAINED = ["base_llm", "encoder", "prealign", "stage1", "stage2", "dpo"]
STAGE_ORDER = ["init", "prealign", "stage1", "merged", "stage2", "dpo"]  # the DRSR stages, in recipe order
QUESTIONS_PER_SET = 2  # spoken answers shown per test set


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _histories(exp_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for stage in TRAINED:
        path = exp_dir / "checkpoints" / stage / "history.jsonl"
        if path.is_file():
            out[stage] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _table(rows: dict[str, dict], metrics: list[str], row_label: str) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = []
    for name, row in rows.items():
        cells = "".join(f"<td>{row[m]:.3f}</td>" if isinstance(row.get(m), (int, float)) else "<td></td>"
                        for m in metrics)
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table><tr><th>{row_label}</th>{head}</tr>{''.join(body)}</table>"


def loss_figure(histories: dict[str, list[dict]]) -> str | None:
    if not histories:
        return None
    fig, axes = plt.subplots(1, len(histories), figsize=(3.2 * len(histories), 2.8), squeeze=False)
    for ax, (stage, history) in zip(axes[0], histories.items()):
        steps = [h["step"] for h in history]
        for key in ("loss", "text_loss", "speech_loss"):
            if all(key in h for h in history):
                ax.plot(steps, [h[key] for h in history], label=key, linewidth=1)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _png(fig)


def dpo_figure(history: list[dict]) -> str | None:
    if not history or "reward_margin" not in history[0]:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 2.8))
    steps = [h["step"] for h in history]
    left.plot(steps, [h["reward_margin"] for h in history], label="reward margin")
    left.plot(steps, [h["chosen_reward"] for h in history], label="chosen")
    left.plot(steps, [h["rejected_reward"] for h in history], label="rejected")
    left.set_xlabel("step")
    left.legend(fontsize=7)
    keys = sorted({k for h in history for k in h if k.startswith("accuracy_")} | {"reward_accuracy"})
    for key in keys:
        points = [(h["step"], h[key]) for h in history if key in h]
        right.plot(*zip(*points), label=key.removeprefix("accuracy_"), linewidth=1)
    right.set_xlabel("step")
    right.set_title("reward accuracy")
    right.legend(fontsize=7)
    return _png(fig)


def comparison_figure(experiments: dict[str, dict], metric: str) -> str | None:
    stages = [s for s in ("init", "prealign", "stage1", "merged", "stage2", "dpo")
              if any(metric in e.get(s, {}) for e in experiments.values())]
    if not stages or len(experiments) < 1:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(stages), 2.8))
    width = 0.8 / len(experiments)
    for i, (name, table) in enumerate(experiments.items()):
        values = [table.get(s, {}).get(metric, 0.0) for s in stages]
        ax.bar([j + i * width for j in range(len(stages))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))], stages)
    ax.set_title(metric)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return _png(fig)


def _wav_uri(samples, sample_rate: int) -> str:
    from fac.data.audio import encode_wav

    return "data:audio/wav;base64," + base64.b64encode(encode_wav(samples, sample_rate)).decode()


def _audio(samples, sample_rate: int, label: str) -> str:
    return (f'<audio controls preload="auto" title="{html.escape(label)}" '
            f'src="{_wav_uri(samples, sample_rate)}"></audio>')


def mel_figure(mels: dict[str, object]) -> str:
    """One row of log-mel images (label -> [frames, 80]), on one colour scale: the reference and each stage's."""
    import numpy as np

    arrays = {label: np.asarray(mel) for label, mel in mels.items()}
    low = min(float(a.min()) for a in arrays.values())
    high = max(float(a.max()) for a in arrays.values())
    fig, axes = plt.subplots(1, len(arrays), figsize=(1.9 * len(arrays), 1.9), squeeze=False)
    for ax, (label, array) in zip(axes[0], arrays.items()):
        ax.imshow(array.T, origin="lower", aspect="auto", vmin=low, vmax=high, cmap="magma")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def spoken_examples(exp_dir: Path, detokenizer_dir: str | Path, data_root: str | Path) -> list[str]:
    """The "Spoken answers" section: the first QUESTIONS_PER_SET questions of each test set in the stages'
    eval/examples/<stage>.json (fac eval --examples), their answers spoken again by the detokenizer (seeded: the
    audio the ASR scorer heard), all in one batch (a command detokenizer runs once), at the detokenizer's rate
    beside the 16 kHz question and reference recordings; the mels are of 16 kHz audio (a 24 kHz answer resampled).
    Empty when no stage has examples."""
    from fac.data.audio import SAMPLE_RATE, read_wav, resample
    from fac.data.detokenizer import FRAMES_PER_UNIT, HOP_LENGTH, load_detokenizer, log_mel

    by_stage = {}
    for stage in STAGE_ORDER:
        path = exp_dir / "eval" / "examples" / f"{stage}.json"
        if path.is_file():
            examples = json.loads(path.read_text())
            if examples:
                by_stage[stage] = {(e["set"], e["id"]): e for e in examples}
    if not by_stage:
        return []
    detokenizer = load_detokenizer(detokenizer_dir)
    rate, data_root = detokenizer.sample_rate, Path(data_root)
    questions: list[tuple[str, str]] = []
    for examples in by_stage.values():
        for key in examples:
            if key not in questions and sum(k[0] == key[0] for k in questions) < QUESTIONS_PER_SET:
                questions.append(key)
    asked = [(stage, key) for key in questions for stage, examples in by_stage.items() if key in examples]
    speech = dict(zip(asked, detokenizer.synthesize_batch([by_stage[stage][key]["units"] for stage, key in asked])))
    parts = ["<h2>Spoken answers</h2>",
             "<p>Test questions answered in text and speech at each stage: the speech spoken by the experiment's "
             "detokenizer, as the ASR scorer heard it (s2s_acc, answer_wer), beside the reference answer's "
             "recording; the mels share one colour scale.</p>"]
    for key in questions:
        first = next(examples[key] for examples in by_stage.values() if key in examples)
        question = read_wav(data_root / first["question_audio"])
        parts.append(f"<h3>{html.escape(key[0])}: {html.escape(first['question'] or key[1])}</h3>")
        parts.append(f"<p>question {_audio(question, SAMPLE_RATE, 'question')} reference answer "
                     f"<b>{html.escape(first['answer'])}</b>")
        mels = {}
        if first.get("reference_audio"):
            reference = read_wav(data_root / first["reference_audio"])
            parts.append(_audio(reference, SAMPLE_RATE, "reference answer"))
            mels["reference"] = log_mel(reference, max(1, len(reference) // (HOP_LENGTH * FRAMES_PER_UNIT)))
        parts.append("</p>")
        rows = []
        for stage, examples in by_stage.items():
            example = examples.get(key)
            if example is None:
                continue
            samples = speech[(stage, key)]
            spoken = _audio(samples, rate, f"{stage} spoken answer") if len(samples) else "(no speech)"
            if len(samples):
                heard = resample(samples, rate, SAMPLE_RATE)
                mels[stage] = log_mel(heard, max(1, len(heard) // (HOP_LENGTH * FRAMES_PER_UNIT)))
            rows.append(f"<tr><th>{stage}</th><td>{html.escape(example['text'])}</td>"
                        f"<td>{html.escape(example['heard'])}</td><td>{spoken}</td></tr>")
        parts.append("<table><tr><th>stage</th><th>text answer</th><th>heard</th><th>spoken answer</th></tr>"
                     + "".join(rows) + "</table>")
        if mels:
            parts.append(f'<img alt="mels: {html.escape(key[1])}" src="{mel_figure(mels)}">')
    return parts


def group_size_of(exp_dir: Path) -> int | None:
    """The grouping k of an experiment's final DRSR checkpoint (None when it has none yet)."""
    for stage in ("dpo", "stage2", "stage1", "prealign"):
        path = exp_dir / "checkpoints" / stage / "config.json"
        if path.is_file():
            return json.loads(path.read_text()).get("audio_config", {}).get("group_size")
    return None


def grouping_rows(results_root: Path, experiments: dict[str, dict]) -> dict[str, dict]:
    """Stage-2 and DPO rows of every experiment, labelled by its grouping k; empty unless k differs."""
    ks = {name: group_size_of(results_root / name) for name in experiments}
    ks = {name: k for name, k in ks.items() if k is not None}
    if len(set(ks.values())) < 2:
        return {}
    rows = {}
    for name, k in sorted(ks.items(), key=lambda item: (item[1], item[0])):
        for stage in ("stage2", "dpo"):
            if stage in experiments[name]:
                rows[f"k={k} ({name}) / {stage}"] = experiments[name][stage]
    return rows


def build_report(results_root: str | Path, experiment: str, out_path: str | Path,
                 detokenizer_dir: str | Path | None = None, data_root: str | Path | None = None) -> dict:
    """Write the HTML report of `experiment` (results_root/<experiment>) beside its metrics; with a detokenizer
    and the experiment's data folder, its spoken answers too (`spoken_examples`)."""
    results_root = Path(results_root)
    exp_dir = results_root / experiment
    metrics_path = exp_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no metrics (run the metrics rule first)")
    metrics = json.loads(metrics_path.read_text())
    all_metrics = sorted({m for row in metrics.values() for m in row},
                         key=lambda m: (m not in HEADLINE, HEADLINE.index(m) if m in HEADLINE else 0, m))
    experiments = {}
    for path in sorted(results_root.glob("*/metrics.json")):
        try:
            experiments[path.parent.name] = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # an experiment being written; the next report picks it up
    histories = _histories(exp_dir)
    parts = [f"<h1>fac report: {html.escape(experiment)}</h1>",
             "<h2>Per-stage metrics</h2>", _table(metrics, all_metrics, "stage")]
    ablations_path = exp_dir / "ablations.json"
    if ablations_path.is_file():
        ablations = json.loads(ablations_path.read_text())
        alpha = {k: v for k, v in ablations.items() if k.startswith("alpha")}
        dpo = {k: v for k, v in ablations.items() if not k.startswith("alpha")}
        columns = [m for m in all_metrics if not m.startswith("encoder") and not m.startswith("train_")]
        parts += ["<h2>Ablation: merge alpha (M = alpha x stage 1 + (1 - alpha) x pre-aligned)</h2>",
                  _table(alpha, columns, "alpha / stage"),
                  "<h2>Ablation: DPO on one dimension vs multi-task</h2>", _table(dpo, columns, "DPO")]
    grouping = grouping_rows(results_root, experiments)
    if grouping:
        columns = [m for m in all_metrics if not m.startswith("encoder")]
        parts += ["<h2>Ablation: grouping k (one experiment per k, the whole recipe each)</h2>",
                  _table(grouping, columns, "k (experiment) / stage")]
    spoken = spoken_examples(exp_dir, detokenizer_dir, data_root) if detokenizer_dir and data_root else []
    parts += spoken
    figure = loss_figure({s: h for s, h in histories.items() if s != "dpo"})
    if figure:
        parts += ["<h2>Loss curves</h2>", f'<img alt="loss curves" src="{figure}">']
    figure = dpo_figure(histories.get("dpo", []))
    if figure:
        parts += ["<h2>DPO rewards</h2>", f'<img alt="dpo rewards" src="{figure}">']
    parts.append(f"<h2>Experiments side by side ({len(experiments)})</h2>")
    for metric in HEADLINE:
        rows = {f"{name} / {stage}": {metric: row[metric]} for name, table in experiments.items()
                for stage, row in table.items() if metric in row}
        if not rows:
            continue
        parts.append(f"<h3>{metric}</h3>")
        figure = comparison_figure(experiments, metric)
        if figure:
            parts.append(f'<img alt="{metric} by experiment" src="{figure}">')
        parts.append(_table(rows, [metric], "experiment / stage"))
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>fac report: " + html.escape(experiment)
            + "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#f3f3f3}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    atomic.write_text(out_path, page)
    return {"experiments": sorted(experiments), "stages": list(metrics), "loss_curves": sorted(histories),
            "ablations": ablations_path.is_file(), "grouping": sorted(grouping),
            "spoken_examples": sum(part.startswith("<h3>") for part in spoken)}
