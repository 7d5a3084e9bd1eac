"""Sequence packing for DRSR training batches: several conversations share one row of the LLM stream.

Each conversation keeps its own positions (restarting at 0), and attention never crosses from one conversation
to another, in the LLM and in the Speech Refined Head alike, so a packed batch gives the loss and gradients of
the same conversations collated one per row (`fac.model.processing.collate`), with less padding.

How the separation reaches the model: `collate_packed` returns `attention_mask=None` and `position_ids` that
restart at 0 for every conversation (padding: 0s). With no 2-D mask and no cache, transformers' Qwen3 mask
builder (`masking_utils.create_causal_mask` -> `find_packed_sequence_indices`) reads every restart of the
positions as a new sequence and builds a causal mask that is block-diagonal over them, for sdpa, eager and flex
attention alike (flash attention uses the same positions for its variable-length kernel). The model turns the
LLM positions p into the SRH's sub-frame positions G*p + j (`_srh_position_ids`), which restart at the same
boundaries, so the SRH's own Qwen3 stack separates the conversations the same way. A 2-D `attention_mask`
passed with these positions would switch that detection off (plain causal over the whole row).

The losses are means over all label tokens of the batch (text and speech separately, `mean_cross_entropy`);
packing keeps the same label tokens, so the means are the same. At a boundary, the last token of a conversation
"predicts" the first token of the next, whose label is ignored (it is the system prompt), as it predicts
padding in an unpacked row.
"""
from __future__ import annotations

import torch

from fac.model.processing import IGNORE_INDEX, Example, SpecialIds, collate


def pack_groups(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` positions (first-fit decreasing).

    Examples are placed longest first (ties: lower index first) into the first row with room, a new row opened
    when none has; each row lists its indices in ascending order, rows in the order they were opened. The result
    is a deterministic function of the lengths, and every index appears exactly once. Raises ValueError for an
    example longer than `max_length` (it cannot fit even alone in a row) or a length below 1.
    """
    if max_length < 1:
        raise ValueError(f"pack_groups: max_length must be at least 1, got {max_length}")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"pack_groups: example {i} has length {n}; every example needs at least 1 position")
        if n > max_length:
            raise ValueError(f"pack_groups: example {i} has length {n}, longer than max_length {max_length}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return [sorted(row) for row in rows]


def collate_packed(groups: list[list[Example]], special_ids: SpecialIds, feature_pad_value: float = 0.0) -> dict:
    """A packed batch: row b is the conversations of groups[b] one after another, right-padded to the longest row.

    Keys as `collate`, plus position_ids [B, S] (0, 1, ... within each conversation; 0 on padding). The
    attention_mask is None: the restarting position_ids are what keeps conversations apart (module docstring).
    input_ids are padded with the text pad and labels with IGNORE_INDEX. The audio keys are `collate`'s for all
    conversations in row order, so the audio rows stay in `<|AUDIO|>` order over the packed stream and the model's
    scatter of audio slots (row-major over [B, S]) lands on the right positions.
    """
    if not groups or any(len(group) == 0 for group in groups):
        raise ValueError("collate_packed: every row needs at least one conversation")
    if any(int(e.labels[0]) != IGNORE_INDEX for group in groups for e in group):
        # The previous conversation's last position would learn to predict it: not what unpacked training does.
        raise ValueError("collate_packed: a conversation's first token must not be a label (it starts a prompt)")
    flat = [example for group in groups for example in group]
    batch = collate(flat, special_ids, feature_pad_value)  # audio keys, in order over the packed rows
    input_ids, labels, position_ids, _ = fill_rows([[(e.input_ids, e.labels) for e in group] for group in groups],
                                                    special_ids.text_pad)
    batch.update(input_ids=input_ids, attention_mask=None, labels=labels, position_ids=position_ids)
    return batch


def fill_rows(rows: list[list[tuple]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Rows of (input ids, labels) sequences laid end to end, right-padded to the longest row: input_ids,
    labels, position_ids (0, 1, ... within each sequence; 0 on padding) and segment_ids (the sequence's index in
    row-major order; -1 on padding), each [B, S]."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    n = 0
    for b, row in enumerate(rows):
        start = 0
        for ids, lab in row:
            end = start + len(ids)
            input_ids[b, start:end] = torch.as_tensor(ids)
            labels[b, start:end] = torch.as_tensor(lab)
            position_ids[b, start:end] = torch.arange(len(ids))
            segment_ids[b, start:end] = n
            start, n = end, n + 1
    return input_ids, labels, position_ids, segment_ids


def pack(examples: list[Example], special_ids: SpecialIds, max_length: int) -> tuple[dict, torch.Tensor]:
    """`examples` packed into rows of at most `max_length` positions (`pack_groups`, `collate_packed`), and where
    each one lies: segments [N, 3] (row, start, end) in the order of `examples` (to score each conversation on its
    own, e.g. DPO's sequence log-probs)."""
    groups = pack_groups([len(e.input_ids) for e in examples], max_length)
    batch = collate_packed([[examples[i] for i in group] for group in groups], special_ids)
    where = {}
    for row, group in enumerate(groups):
        start = 0
        for i in group:
            where[i] = (row, start, start + len(examples[i].input_ids))
            start += len(examples[i].input_ids)
    return batch, torch.tensor([where[i] for i in range(len(examples))], dtype=torch.long)


def pack_token_rows(sequences: list[tuple[list[int], list[int]]], max_length: int,
                    pad_id: int) -> dict[str, torch.Tensor | None]:
    """Plain token sequences (input ids, labels), e.g. the base LLM's documents and text QA, packed into rows of
    at most `max_length` positions (`pack_groups`): the same mechanism as `collate_packed`, for a model without
    audio.

    Returns input_ids and labels [B, S] (padding: `pad_id`, IGNORE_INDEX), position_ids restarting at 0 for
    every sequence (0 on padding), attention_mask None, and segment_ids [B, S]: the index in `sequences` of the
    sequence each position belongs to (-1 on padding), for what is drawn per example (the base LLM's slot
    noise). A sequence's first label is ignored: in a row of its own, position 0 is never predicted (the loss
    shifts by one), so in a packed row the previous sequence's last position must not learn to predict it.
    The loss (a mean over the same label tokens) and its gradients are those of one row per sequence, with the
    model called with use_cache=False: given a cache, transformers skips the detection of packed positions and
    builds one causal mask over the whole row.
    """
    groups = pack_groups([len(ids) for ids, _ in sequences], max_length)
    first_ignored = [(ids, [IGNORE_INDEX, *lab[1:]]) for ids, lab in sequences]
    input_ids, labels, position_ids, order = fill_rows([[first_ignored[i] for i in group] for group in groups],
                                                        pad_id)
    index = torch.tensor([i for group in groups for i in group] + [-1])  # row-major order -> index in sequences
    return {"input_ids": input_ids, "attention_mask": None, "labels": labels, "position_ids": position_ids,
            "segment_ids": index[order]}
