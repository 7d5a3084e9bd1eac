"""Multi-task DPO (the paper's third stage): preference pairs on four dimensions, sigmoid DPO loss.

A pair is one user clip with a chosen and a rejected assistant reply. Replies are scored by their whole
log-probability under the model: the text stream's tokens plus, for spoken replies, the SRH's speech codes
(teacher forced, the tokens the training losses score but the fillers: `<|sil|>` in the text stream, the delay's
speech-bos codes), summed or, with `logps: mean`, averaged (see LOGPS), so text and speech outputs both take part.

    loss_i = w_d(i) * -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

with pi the policy's and ref the frozen reference's sequence log-probs, w_d the weight of the pair's
dimension (all 1: the mean equals TRL's sigmoid DPO loss; tests/test_train_dpo.py checks that against
TRL itself). The reference is the stage-2 model; its log-probs are computed once, before training, on the
stage's device and precision (under torchrun shared among the ranks, written by rank 0 alone), and kept beside
the resume points.

Preference pairs come from the stage-2 model's own outputs and the world's ground truth:
- robustness: noisy copies of training questions; the correct answer (text and speech) chosen over the
  model's own wrong answer (another value of the attribute, drawn, when the model answered right);
- audio_understanding: an emotion clip with the question how the speaker sounds; the emotion carried
  by prosody chosen over the model's wrong guess (text);
- empathy: an emotion clip whose words are neutral; the reply that fits the emotion (text and speech)
  chosen over the reply that fits another one;
- instruction_following: a training question whose system prompt asks for a speaking style ("Say the
  answer slowly."); the answer said in that style chosen over the model's own spoken answer when its length
  does not follow the style (fac.data.manifests.follows_style), else over the answer said normally (text and
  speech; the text is the true answer on both sides, so the pair is about how it is said).
"""
from __future__ import annotations

import json
import logging
import os
import random
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fac import atomic, faults
from fac.data.manifests import follows_style, spoken_reply_budget, spoken_units
from fac.data.text_tokenizer import AUDIO_QUESTION_PROMPT, SYSTEM_PROMPTS
from fac.devices import CPU, Placement, device_of, to_device
from fac.model import load_checkpoint
from fac.model.processing import IGNORE_INDEX, SpecialIds, build_example, collate
from fac.train.data import FeatureCache, SpokenRecord, encode_text, load_records
from fac.train.trainer import EpochOrder, StageConfig, Trainer, epoch_mode, files_identity, fingerprint, step_rng

log = logging.getLogger("fac.train")

DIMENSIONS = ("robustness", "instruction_following", "audio_understanding", "empathy")
# A user's preference pair (data source manifests) without `meta.dimension` is of dimension "general".
PAIR_DIMENSIONS = DIMENSIONS + ("general",)


# ----------------------------------------------------------------------------------------------- the loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, weights: torch.Tensor | None = None):
    """Sigmoid DPO on sequence log-probs [N]: (weighted mean loss, per-pair losses, chosen and rejected rewards)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    weighted = losses if weights is None else losses * weights
    return weighted.mean(), losses, chosen_rewards.detach(), rejected_rewards.detach()


# How a reply's scored targets make its sequence log-prob (params dpo.logps). Either way the fillers do not count:
# the text stream's `<|sil|>` while the speech goes on (one per 5-code slot after the transcript) and the speech
# delay's speech-bos codes, so a longer spoken reply gains no targets that are free to the model.
# - sum: the summed log-prob of the content targets (DPO as published, TRL's sigmoid loss);
# - mean: their mean (length-normalised: a reply is scored per target, so pairs of different lengths, a slow and a
#   normal answer say, are compared on how likely each target is, not on how many there are).
LOGPS = ("sum", "mean")


def sequence_logps(model, batch: dict, reduce: str = "sum") -> torch.Tensor:
    """Log-prob of each conversation's reply from its content targets (reply text tokens and speech codes, the
    fillers left out: see LOGPS), summed or averaged (`reduce`). One per row [B], or with a packed batch (PairData
    with `packing`: its `segments`, [N, 3] row, start, end) one per conversation [N] in the order of the segments."""
    if reduce not in LOGPS:
        raise ValueError(f"dpo logps {reduce!r}: expected one of {LOGPS}")
    segments = batch.pop("segments", None)
    out = model(**batch)
    # Under the deepspeed backend `model` is the engine, whose own `config` is DeepSpeed's: read the model's.
    config = getattr(model, "module", model).config
    g = config.audio_config.group_size
    text_labels = out.text_labels[:, 1:]
    text_logits = out.text_logits[:, :-1].float()
    mask = (text_labels != IGNORE_INDEX) & (text_labels != config.text_config.sil_index)
    text = torch.gather(text_logits.log_softmax(-1), 2, text_labels.clamp(min=0)[..., None])[..., 0] * mask
    count = mask.sum(-1)
    speech = smask = None
    if out.speech_logits is not None and out.speech_labels is not None:
        targets = F.pad(out.speech_labels[:, g:], (0, g), value=IGNORE_INDEX)  # sub-frame q predicts label q+G
        smask = (targets != IGNORE_INDEX) & (targets != config.audio_config.bos_token_id)
        speech = torch.gather(out.speech_logits.float().log_softmax(-1), 2, targets.clamp(min=0)[..., None])[..., 0]
        speech = speech * smask
    if segments is None:
        total = text.sum(-1) + (speech.sum(-1) if speech is not None else 0)
        count = count + (smask.sum(-1) if smask is not None else 0)
    else:
        # Position t scores the label at t + 1 (sub-frame q the label at q + G): a conversation's targets are scored
        # from its own positions; the label at the next conversation's first position is its prompt, never a target.
        spans = segments.tolist()
        total = torch.stack([text[row, start:end].sum() for row, start, end in spans])
        count = torch.stack([mask[row, start:end].sum() for row, start, end in spans])
        if speech is not None:
            total = total + torch.stack([speech[row, start * g:end * g].sum() for row, start, end in spans])
            count = count + torch.stack([smask[row, start * g:end * g].sum() for row, start, end in spans])
    return total if reduce == "sum" else total / count.clamp(min=1)


# ----------------------------------------------------------------------------------------------- pairs


class Reply:
    """An assistant reply: text and, when spoken, its 25 Hz speech codes."""

    def __init__(self, text: str, codes: list[int] | None):
        self.text, self.codes = text, codes

    def to_json(self) -> dict:
        return {"text": self.text, "codes": self.codes}


def _spoken_replies(records: list[SpokenRecord]) -> dict[str, list[int]]:
    """Reply text -> speech codes of its assistant clip (every value and reply is spoken by the assistant)."""
    out = {}
    for rec in records:
        if rec.codes is not None and rec.text not in out:
            out[rec.text] = list(rec.codes)
    return out


@torch.no_grad()
def _generate_texts(model, tokenizer, features: FeatureCache, records: list[SpokenRecord], system: str, special, g,
                    placement: Placement, batch_size: int, desc: str) -> list[str]:
    """The model's greedy text answer (s2t, 6 tokens) to each record's clip under `system`, batched
    (fac.model.generation.generate_each: each exactly its one-at-a-time answer)."""
    from fac.model.generation import generate_each
    from fac.model.processing import build_prompt

    prompts = [build_prompt(encode_text(tokenizer, system), features(rec.user_path), special, g)
               for rec in tqdm(records, desc=f"{desc}: prompts", unit="clip")]
    with placement.autocast():
        said = generate_each(model, prompts, special, mode="s2t", budgets=[6] * len(prompts), batch_size=batch_size)
    faults.point("preferences")
    return [tokenizer.decode(text, skip_special_tokens=True).strip() for text, _ in said]


@torch.no_grad()
def _generate_units(model, tokenizer, features: FeatureCache, records: list[SpokenRecord], special, g,
                    placement: Placement, batch_size: int) -> list[list[int]]:
    """The speech codes of the model's greedy spoken answer to each record, under the record's own system prompt."""
    from fac.model.generation import generate_each
    from fac.model.processing import build_prompt

    prompts = [build_prompt(encode_text(tokenizer, rec.system), features(rec.user_path), special, g)
               for rec in tqdm(records, desc="instruction following: prompts", unit="q")]
    budgets = [spoken_reply_budget(len(rec.codes), g) for rec in records]
    with placement.autocast():
        said = generate_each(model, prompts, special, mode="s2m", budgets=budgets, batch_size=batch_size)
    return [spoken_units(speech, model.config.audio_config) for _, speech in said]


def build_preferences(model_dir: str, manifest_dir: str, data_root: str, world_dir: str, out_path: str,
                      seed: int = 0, max_per_dimension: int | None = None, placement: Placement = CPU,
                      batch_size: int = 16) -> dict:
    """Preference pairs of the four dimensions from the model's own answers (a dimension whose training
    manifest is absent gets none), generated on `placement` (fac.devices.resolve; `fac train preferences --gpus
    --precision`): its device, under autocast in its dtype on GPU; `batch_size` greedy answers per left-padded
    batch, each exactly its one-at-a-time answer."""
    from fac.train.stages import load_tokenizer

    model = load_checkpoint(model_dir).eval().to(placement.device)
    tokenizer = load_tokenizer(model_dir)
    special = SpecialIds.from_tokenizer(tokenizer, model.config)
    g = model.config.audio_config.group_size
    features = FeatureCache(data_root, model.config.audio_config.num_mel_bins)
    rng = random.Random(seed)
    qa = {json.loads(line)["id"]: json.loads(line)
          for line in (Path(world_dir) / "text_qa.jsonl").read_text().splitlines() if line}
    values: dict[str, set[str]] = {}
    for pair in qa.values():
        values.setdefault(pair["attribute"], set()).add(pair["answer"])

    def load(name):
        return [SpokenRecord(r, f"{manifest_dir}/{name}.jsonl") for r in load_records(manifest_dir, name)]

    qa_train, noisy, paraling = load("spoken_qa_train"), load("spoken_qa_train_noisy"), load("paraling_train")
    answer_codes = _spoken_replies(qa_train)
    reply_codes = _spoken_replies(paraling)
    pairs, counts = [], {d: {"pairs": 0, "model_wrong": 0} for d in DIMENSIONS}

    def take(records):
        records = list(records)
        rng.shuffle(records)
        return records[:max_per_dimension] if max_per_dimension else records

    robust = take(noisy)
    texts = _generate_texts(model, tokenizer, features, robust, SYSTEM_PROMPTS["s2t"], special, g, placement,
                            batch_size, "preferences robustness")
    for rec, said in zip(robust, texts):
        answer, attribute = rec.meta["answer"], qa[rec.meta["qa"]]["attribute"]
        said = said.split()
        said = said[0] if said else ""
        wrong = said != answer and said in answer_codes
        rejected = said if wrong else rng.choice(sorted(values[attribute] - {answer}))
        counts["robustness"]["model_wrong"] += wrong
        pairs.append(_pair("robustness", rec, SYSTEM_PROMPTS["s2m"], Reply(answer, answer_codes.get(answer)),
                           Reply(rejected, answer_codes.get(rejected)), said))
    emotions = sorted({rec.meta["emotion"] for rec in paraling})
    understood = take(paraling)
    texts = _generate_texts(model, tokenizer, features, understood, AUDIO_QUESTION_PROMPT, special, g, placement,
                            batch_size, "preferences audio understanding")
    for rec, said in zip(understood, texts):
        emotion = rec.meta["emotion"]
        said = said.split()
        said = said[0] if said else ""
        wrong = said != emotion and said in emotions
        counts["audio_understanding"]["model_wrong"] += wrong
        rejected = said if wrong else rng.choice([e for e in emotions if e != emotion])
        pairs.append(_pair("audio_understanding", rec, AUDIO_QUESTION_PROMPT, Reply(emotion, None),
                           Reply(rejected, None), said))
    replies = {rec.meta["emotion"]: rec.meta["reply"] for rec in paraling}
    empathic = take(paraling)
    texts = _generate_texts(model, tokenizer, features, empathic, SYSTEM_PROMPTS["s2m"], special, g, placement,
                            batch_size, "preferences empathy")
    for rec, said in zip(empathic, texts):
        fitting = rec.meta["reply"]
        wrong = said != fitting and said in replies.values()
        counts["empathy"]["model_wrong"] += wrong
        rejected = said if wrong else replies[rng.choice([e for e in emotions if e != rec.meta["emotion"]])]
        pairs.append(_pair("empathy", rec, SYSTEM_PROMPTS["s2m"], Reply(fitting, reply_codes.get(fitting)),
                           Reply(rejected, reply_codes.get(rejected)), said))
    instruct = load("instruct_train") if (Path(manifest_dir) / "instruct_train.jsonl").is_file() else []
    styled = take(instruct)
    spoken = _generate_units(model, tokenizer, features, styled, special, g, placement, batch_size)
    for rec, units in zip(styled, spoken):
        answer = rec.meta["answer"]
        follows = follows_style(len(units), len(rec.codes), rec.meta["normal_units"])
        counts["instruction_following"]["model_wrong"] += not follows
        if units and not follows:
            rejected = Reply(answer, units)
        elif answer in answer_codes:
            rejected = Reply(answer, answer_codes[answer])
        else:  # the normal answer clip was dropped with its questions: no rejected side to offer
            continue
        pairs.append(_pair("instruction_following", rec, rec.system, Reply(answer, list(rec.codes)), rejected,
                           f"{len(units)} speech units (styled answer {len(rec.codes)}, normal "
                           f"{rec.meta['normal_units']})"))
    for pair in pairs:
        counts[pair["dimension"]]["pairs"] += 1
    if not pairs:
        raise ValueError(f"{manifest_dir}: no preference pairs could be built (empty training manifests?)")
    atomic.write_text(out_path, "".join(json.dumps(p) + "\n" for p in pairs))
    return counts


def _pair(dimension: str, rec: SpokenRecord, system: str, chosen: Reply, rejected: Reply, said: str) -> dict:
    if (chosen.codes is None) != (rejected.codes is None):  # both spoken or both text
        chosen, rejected = Reply(chosen.text, None), Reply(rejected.text, None)
    return {"dimension": dimension, "system": system, "user_path": rec.user_path, "id": rec.meta.get("id"),
            "chosen": chosen.to_json(), "rejected": rejected.to_json(), "model_said": said}


def read_pairs(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no preference pairs (run the preferences rule first)")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
            if pair["dimension"] not in PAIR_DIMENSIONS or not pair["chosen"]["text"] or not pair["rejected"]["text"]:
                raise ValueError("unknown dimension or empty reply")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{n}: not a preference pair ({error})") from error
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


# ----------------------------------------------------------------------------------------------- training


class PairData:
    """Chosen/rejected examples of each pair, batched as [chosen..., rejected...] with the reference log-probs."""

    def __init__(self, pairs: list[dict], features: FeatureCache, tokenizer, special: SpecialIds, group_size: int,
                 dimensions: dict[str, float], max_length: int | None = None, packing: bool = False):
        if packing and not max_length:
            raise ValueError("dpo packing: give max_length, the length of a packed row")
        self.packing, self.max_length = packing, max_length
        self.pairs = [p for p in pairs if dimensions.get(p["dimension"], 1.0) > 0]
        if not self.pairs:
            raise ValueError(f"every dimension with pairs has weight 0 (weights {dimensions})")
        self.features, self.tokenizer, self.special, self.g = features, tokenizer, special, group_size
        self._system_ids: dict[str, list[int]] = {}
        self.dropped = 0
        if max_length:  # a pair either side of which is longer leaves the stage (see SpokenData: dropped, not cut)
            keep = [p for p in self.pairs if max(len(self.example(p, side).input_ids) for side in ("chosen", "rejected"))
                    <= max_length]
            self.dropped = len(self.pairs) - len(keep)
            if self.dropped:
                log.warning("dpo: %d of %d pairs are longer than max_length %d positions; left out",
                            self.dropped, len(self.pairs), max_length)
            if not keep:
                raise ValueError(f"dpo: every preference pair is longer than max_length {max_length}")
            self.pairs = keep
        self.weights = [float(dimensions.get(p["dimension"], 1.0)) for p in self.pairs]
        self.ref: list[tuple[float, float]] | None = None
        self.order: EpochOrder | None = None

    def example(self, pair: dict, side: str):
        reply = pair[side]
        if pair["system"] not in self._system_ids:
            self._system_ids[pair["system"]] = encode_text(self.tokenizer, pair["system"])
        return build_example(self._system_ids[pair["system"]], self.features(pair["user_path"]),
                             encode_text(self.tokenizer, reply["text"]), reply["codes"], self.special, self.g)

    def batch_of(self, indices: list[int]) -> dict:
        examples = [self.example(self.pairs[i], "chosen") for i in indices]
        examples += [self.example(self.pairs[i], "rejected") for i in indices]
        if not self.packing:
            batch = collate(examples, self.special)
        else:  # chosen and rejected sides packed into max_length rows; `segments` say where each one lies
            from fac.train.packing import pack

            batch, batch["segments"] = pack(examples, self.special, self.max_length)
        batch["pair_index"] = torch.tensor(indices)
        return batch

    def batch(self, step: int, batch_size: int, seed: int) -> dict:
        if self.order is not None:  # passes without replacement (a stage with `epochs`)
            return self.batch_of(self.order.take(step, batch_size))
        rng = step_rng(seed, step)
        return self.batch_of([rng.randrange(len(self.pairs)) for _ in range(batch_size)])


@torch.no_grad()
def reference_logps(model, data: PairData, batch_size: int = 8, placement: Placement | None = None, rank: int = 0,
                    world_size: int = 1, reduce: str = "sum") -> list[tuple[float, float]]:
    """The (chosen, rejected) sequence log-probs of every pair, in the pairs' order, computed on `placement`'s device
    under its autocast (None: where the model is, fp32); the model goes back where it was, in train mode.

    With world_size > 1 (every rank calls it) rank r computes every world_size-th of the batches a single process
    computes, the same batches, so the same values; the ranks gather them and each returns the full list."""
    where = device_of(model)
    device = placement.device if placement is not None else where
    model.eval().to(device)
    starts = list(range(0, len(data.pairs), batch_size))
    mine: dict[int, list[tuple[float, float]]] = {}
    for start in tqdm(starts[rank::world_size], desc="reference log-probs", unit="batch", disable=rank != 0):
        idx = list(range(start, min(start + batch_size, len(data.pairs))))
        batch = data.batch_of(idx)
        batch.pop("pair_index")
        with placement.autocast() if placement is not None else nullcontext():
            logps = sequence_logps(model, to_device(batch, device), reduce).float().cpu()
        n = len(idx)
        mine[start] = list(zip(logps[:n].tolist(), logps[n:].tolist()))
    if world_size > 1:
        parts: list[dict | None] = [None] * world_size
        torch.distributed.all_gather_object(parts, mine)
        mine = {start: values for part in parts for start, values in part.items()}
    model.to(where).train()
    return [pair for start in starts for pair in mine[start]]


def write_reference(ref_file: Path, values: list[tuple[float, float]]) -> None:
    """reference_logps.json, atomically (a killed write leaves none, never half a file)."""
    atomic.write_text(ref_file, json.dumps(values))


def cached_reference(model, data: PairData, ref_file: Path, placement: Placement,
                     reduce: str = "sum") -> list[tuple[float, float]]:
    """The reference log-probs from `ref_file`, or computed once and written there: under several processes
    (WORLD_SIZE > 1, the process group already up) sharded over the ranks and gathered, written by rank 0 alone;
    every rank returns the full list."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world_size = ((torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed
                        else (0, 1))
    cached = [ref_file.is_file()]
    if world_size > 1:  # rank 0's view decides for all
        torch.distributed.broadcast_object_list(cached, src=0)
    if cached[0]:
        return [tuple(x) for x in json.loads(ref_file.read_text())]
    values = reference_logps(model, data, placement=placement, rank=rank, world_size=world_size, reduce=reduce)
    if rank == 0:
        write_reference(ref_file, values)
    if world_size > 1:
        torch.distributed.barrier()  # no rank goes on (or ends) before the file is in place
    return [tuple(x) for x in values]


def train_dpo(stage: dict, model_dir: str, pairs_path: str, data_root: str, out_dir: str, state_root: str,
              run_info: dict) -> dict:
    """DPO from the stage-2 model (policy initialised from it, reference = it, frozen, log-probs cached).

    The stage's gpus and precision place the reference pass and the training (fac.devices.resolve); under
    torchrun (WORLD_SIZE > 1) the process group comes up first and the reference pass is shared among the ranks."""
    from fac.train.distributed import init_process_group, stage_placement
    from fac.train.stages import _identity, _save_with_tokenizer, load_tokenizer, resolve_steps

    placement = stage_placement("stage dpo", stage.get("backend", "torch"), stage.get("gpus", 0),
                                stage.get("precision", "fp32"))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        init_process_group(placement.on_gpu)  # idempotent: the DeepSpeed engine finds it up
    model = load_checkpoint(model_dir)
    tokenizer = load_tokenizer(model_dir)
    special = SpecialIds.from_tokenizer(tokenizer, model.config)
    features = FeatureCache(data_root, model.config.audio_config.num_mel_bins)
    weights = {d: float(w) for d, w in (stage.get("dimension_weights") or {}).items()}
    unknown = set(weights) - set(PAIR_DIMENSIONS)
    if unknown:
        raise ValueError(f"dpo.dimension_weights: unknown dimension(s) {sorted(unknown)}; expected {PAIR_DIMENSIONS}")
    data = PairData(read_pairs(pairs_path), features, tokenizer, special, model.config.audio_config.group_size,
                    weights, stage.get("max_length"), bool(stage.get("packing")))
    beta = float(stage.get("beta", 0.1))
    reduce = stage.get("logps", "sum")  # checked by sequence_logps on the reference pass, before any training
    if epoch_mode(stage):
        data.order = EpochOrder(len(data.pairs), int(stage.get("seed", 0)))
    cfg = StageConfig.from_params(resolve_steps(stage, len(data.pairs)))
    # The reference log-probs cached here belong to this stage-2 checkpoint and these pairs (content hashes).
    # (`logps` always in the fingerprint: the fillers' leaving the log-probs changed them under every setting.)
    key = fingerprint({**stage, "logps": reduce}, files_identity(pairs_path), _identity(model_dir))
    state_dir = Path(state_root) / f"dpo-{key}"
    ref_file = state_dir / "reference_logps.json"
    data.ref = cached_reference(model, data, ref_file, placement, reduce)
    if len(data.ref) != len(data.pairs):
        raise RuntimeError(f"{ref_file}: {len(data.ref)} reference log-probs for {len(data.pairs)} pairs; delete it")
    dims = sorted({p["dimension"] for p in data.pairs})

    def loss_fn(m, batch):
        index = batch.pop("pair_index").tolist()
        logps = sequence_logps(m, batch, reduce)
        n = len(index)
        ref = torch.tensor([data.ref[i] for i in index], dtype=logps.dtype, device=logps.device)
        w = torch.tensor([data.weights[i] for i in index], dtype=logps.dtype, device=logps.device)
        loss, _, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], beta, w)
        margin = chosen - rejected
        parts = {"reward_margin": margin.mean().item(), "reward_accuracy": (margin > 0).float().mean().item(),
                 "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item()}
        for d in dims:
            sel = torch.tensor([data.pairs[i]["dimension"] == d for i in index], device=margin.device)
            if sel.any():
                parts[f"accuracy_{d}"] = (margin[sel] > 0).float().mean().item()
        return loss, parts

    trainer = Trainer(model, cfg, loss_fn, lambda step: data.batch(step, cfg.batch_size, cfg.seed), state_dir,
                      "dpo", run_info)
    summary = trainer.train()
    summary["pairs"] = {d: sum(p["dimension"] == d for p in data.pairs) for d in dims}
    _save_with_tokenizer(model, tokenizer, out_dir, summary, trainer.history)
    trainer.finish()
    return summary



