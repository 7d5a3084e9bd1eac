"""Training compute of grouping by k, counted on the meta device: FLOPs and activation memory of one training
step (forward + backward) on ONE long conversation, for the paper's 8B geometry and the tiny default, with the
model built on the meta device (no weights are allocated, nothing is computed; an 8B step takes ~7 s on a CPU).

The paper's claim: grouping k=5 speech tokens into one LLM position (a 5 Hz backbone) instead of k=1 (25 Hz)
saves about half the training compute. This script counts what a step costs at k = 1, 4, 5, 6.

The conversation (--minutes, default 6): half the time is the user speaking, half the assistant, in --turns
(default 6) alternating exchanges of equal length (6 min: 6 x (30 s user + 30 s assistant)).
- user turns: log-mel features at 100 frames/s into the mel encoder (`continuous_audio_tower`), whose output
  replaces the placeholder speech tokens (int(25 * seconds) per turn) in the speech-token encoder;
- assistant turns: 25 Hz speech tokens (10 delay tokens, then the codes) and their transcript at
  --text-tokens-per-second (default 3: about 3 words/s, one token per word), fused into the audio slots as in
  training (so the transcript adds no LLM positions);
- a 20-token system prompt and the template's turn markers.
The batch is laid out by `fac.model.processing` (build_conversation, the multi-turn form of build_example, and
collate) on the CPU and then moved to the meta device, so the sequence lengths follow k as in the real model:
the LLM sees text + ceil(speech tokens / k) positions per audio, the SRH runs at 25 Hz on k x the LLM length.

What is counted, per k:
- FLOPs of forward + backward (torch.utils.flop_counter's FlopCounterMode and formulas: matmuls, convolutions
  and attention, 2 FLOPs per multiply-add; attention counts the full S x S score matrix, causal or not, and its
  backward 2.5 x its forward, as torch's counter does). The optimizer step is not counted. Each op is attributed
  to one component: in forward the one whose module is running, in backward the one whose forward created the
  autograd node that is running (`ComponentTracker`). FlopCounterMode's own per-module attribution is not used:
  its ModuleTracker does follow backward in this torch, but it leaves a module only when the gradients of its
  positional tensor inputs arrive, so modules called with keyword tensors (transformers' attention blocks, the
  SRH stack) or with inputs that need no gradient (embeddings, the mel encoder) stay entered until the end of
  backward, and most backward ops land under several components at once. The script checks that the components
  add up to FlopCounterMode's total.
- activation memory: bytes of the tensors autograd saves for backward in one forward (saved-tensor hooks,
  parameters excluded, each storage counted once by the identity of its storage, which also works on meta),
  attributed to the component whose forward saved them. The 8B model is built in bfloat16 (as a bf16 training
  run holds its weights and activations), the tiny one in float32. No activation checkpointing.
Components: mel encoder (`continuous_audio_tower`), speech-token encoder (`audio_tower`), LLM
(`language_model`, with its text head), SRH (`audio_invert_tower`), other (the model's own forward outside those:
the two losses' float32 logits and log-softmax, embedding sums); "backbone" = what grouping shortens: the
speech-token encoder + the LLM (the mel encoder runs at 50 Hz and the SRH at 25 Hz whatever k is).

Two measures make the meta device and the CPU agree (tests/test_bench_compute.py) and mirror a GPU run:
- attention runs as one fused FlashAttention-style op (`_scaled_dot_product_flash_attention_for_cpu`, which has
  CPU and meta kernels) that saves q, k, v (k and v with their own heads under grouped-query attention), the
  output and the log-sum-exp, not the S x S matrix; its FLOPs use torch's own SDPA formulas. (Without this, torch
  picks that kernel on the CPU, whose FLOPs torch's counter does not count at all, and the math kernel on meta,
  which saves the S x S attention matrix.)
- the model's forward reads a few values (lengths, masks: `.item()`, `.tolist()`, boolean indexing) that meta
  tensors do not have; `MetaValues` keeps a CPU copy of every integer and boolean meta tensor, so that those
  reads and the data-dependent shapes work (floating-point tensors stay meta).

    .venv/bin/python bench/bench_compute.py                  # 8B and tiny, k = 1 4 5 6, one 6-minute conversation
    .venv/bin/python bench/bench_compute.py --group-sizes 1 5 --minutes 2 --geometries paper_8b
Results: bench/results/compute.json (settings, per-geometry per-k numbers, ratios to the first k).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402
from torch.utils.weak import WeakTensorKeyDictionary  # noqa: E402

from bench_grouping import SPECIAL, TEMPLATE, VOCAB  # noqa: E402
from fac.model import FunAudioChatForConditionalGeneration, build_config  # noqa: E402
from fac.model.builders import paper_8b_config  # noqa: E402
from fac.model.processing import (AssistantTurn, SpecialIds, UserTurn, build_conversation, collate,  # noqa: E402
                                  speech_length_of_frames)

aten = torch.ops.aten
COMPONENTS = {"continuous_audio_tower": "mel_encoder", "audio_tower": "speech_encoder", "language_model": "llm",
              "audio_invert_tower": "srh"}
COLUMNS = ["mel_encoder", "speech_encoder", "llm", "srh", "other", "backbone", "total"]
BACKBONE = ("speech_encoder", "llm")  # what grouping shortens
SYSTEM_TOKENS = 20


# ----------------------------------------------------------------------------------------------- geometries

def tiny_params(group_size: int) -> dict:
    """The embedded default's `model` section (params/default.yaml) with the sizes the pipeline fills in from the
    tiny world (the BPE's vocabulary and special tokens, the 256-unit speech codebook plus bos/eos/pad/unused)."""
    model = yaml.safe_load((ROOT / "params" / "default.yaml").read_text())["model"]
    params = {name: dict(section) for name, section in model.items()}
    params["llm"]["vocab_size"] = VOCAB
    params["speech"] = {**params["speech"], "codebook_size": 260, "group_size": group_size}
    params["special_ids"] = dict(SPECIAL)
    return params


def geometry_config(geometry: str, group_size: int):
    """(FunAudioChatConfig, dtype the step runs in) of a named geometry."""
    if geometry == "paper_8b":
        return paper_8b_config(group_size), torch.bfloat16
    if geometry == "tiny":
        return build_config(tiny_params(group_size)), torch.float32
    raise ValueError(f"unknown geometry {geometry!r}; expected paper_8b or tiny")


def build_model(config, device: str = "meta", dtype: torch.dtype = torch.float32):
    """The model in training mode on `device` (meta: no memory) in `dtype`."""
    with torch.device(device):
        model = FunAudioChatForConditionalGeneration(config)
    return model.to(dtype).train()


# ----------------------------------------------------------------------------------------------- the input

def conversation(config, minutes: float = 6.0, turns: int = 6, user_share: float = 0.5,
                 text_tokens_per_second: float = 3.0, seed: int = 0, user_features: bool = True) -> tuple[dict, dict]:
    """(CPU batch of one conversation as the model's named inputs, its layout): `turns` exchanges of a user
    speaking (log-mel features) and the assistant answering in speech (codes + transcript), `minutes` in all,
    `user_share` of it the user's. Values are random; only the sizes matter for compute. Without `user_features`
    the user's audio is only its placeholder speech (the same LLM and SRH lengths, no mel encoder)."""
    gen = torch.Generator().manual_seed(seed)
    ids = SpecialIds.from_config(config, **TEMPLATE)
    audio_cfg = config.audio_config
    seconds = 60.0 * minutes / turns
    user_frames = int(round(seconds * user_share * 100))  # 100 mel frames per second
    codes = int(round(seconds * (1 - user_share) * 25))  # 25 speech tokens per second
    text = max(1, int(round(seconds * (1 - user_share) * text_tokens_per_second)))
    words = lambda n: torch.randint(11, 1000, (n,), generator=gen).tolist()  # noqa: E731
    dialogue = []
    for _ in range(turns):
        user = (torch.randn(audio_cfg.num_mel_bins, user_frames, generator=gen) if user_features
                else speech_length_of_frames(user_frames))
        dialogue.append(UserTurn([user]))
        dialogue.append(AssistantTurn(words(text), torch.randint(0, audio_cfg.bos_token_id, (codes,),
                                                                 generator=gen).tolist()))
    example = build_conversation(words(SYSTEM_TOKENS), dialogue, ids, audio_cfg.group_size)
    batch = collate([example], ids)
    layout = {"minutes": minutes, "turns": turns, "user_seconds_per_turn": seconds * user_share,
              "assistant_seconds_per_turn": seconds * (1 - user_share), "mel_frames_per_user_turn": user_frames,
              "speech_tokens_per_assistant_turn": codes, "text_tokens_per_assistant_turn": text,
              "system_tokens": SYSTEM_TOKENS, "user_features": user_features}
    return batch, layout


def sequence_lengths(config, batch: dict) -> dict:
    g = config.audio_config.group_size
    llm = int(batch["input_ids"].shape[1])
    return {"llm_sequence_length": llm, "srh_sequence_length": g * llm,
            "audio_positions": int((batch["input_ids"] == config.audio_token_index).sum()),
            "mel_frames": int(batch["feature_attention_mask"].sum()) if batch["input_features"] is not None else 0}


# ----------------------------------------------------------------------------------------------- meta values

class MissingValue(RuntimeError):
    pass


def _is_meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _is_value_dtype(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex)


class _MetaConstructors(TorchFunctionMode):
    """torch.tensor(..., device="meta") reaches no dispatch mode: build it on the CPU and move it, so that the
    move (seen by MetaValues) records its value."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device).type == "meta":
            return func(*args, **{**kwargs, "device": "cpu"}).to("meta")
        return func(*args, **kwargs)


class MetaValues(TorchDispatchMode):
    """Meta tensors with values where the forward needs them: every integer or boolean meta tensor carries a CPU
    copy (computed by running the same op on the CPU copies of its inputs), which answers `.item()`, `.tolist()`,
    `.cpu()` and gives the shapes of data-dependent ops (boolean indexing, nonzero, masked_select). Floating-point
    tensors stay shape-only. Use as a context manager around the forward and backward (and the move to meta)."""

    def __init__(self):
        super().__init__()
        self.values = WeakTensorKeyDictionary()
        self._constructors = _MetaConstructors()

    def __enter__(self):
        self._constructors.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._constructors.__exit__(*exc)
        return out

    def value(self, t):
        if not _is_meta(t):
            return t
        v = self.values.get(t)
        if v is None:
            raise MissingValue(f"a meta tensor {tuple(t.shape)} {t.dtype} has no value")
        return v

    def _meta_of(self, v: torch.Tensor) -> torch.Tensor:
        meta = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        self.values[meta] = v
        return meta

    def _bool_indices_to_long(self, indices):
        out = []
        for index in indices:
            if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
                with _disable_current_modes():
                    columns = self.value(index).nonzero().unbind(1)
                out.extend(self._meta_of(c) if _is_meta(index) else c for c in columns)
            else:
                out.append(index)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # data-dependent reads and shapes
        if func is aten._local_scalar_dense.default:
            with _disable_current_modes():
                return self.value(args[0]).item()
        leaves_meta = torch.device(kwargs.get("device") or "meta").type != "meta"
        if func is aten._to_copy.default and _is_meta(args[0]) and leaves_meta:
            with _disable_current_modes():
                return func(self.value(args[0]), **kwargs)
        if func is aten.nonzero.default:
            with _disable_current_modes():
                return self._meta_of(self.value(args[0]).nonzero())
        if func is aten.masked_select.default:
            source, mask = args
            with _disable_current_modes():
                shape = torch.broadcast_shapes(source.shape, mask.shape)
                count = int(torch.broadcast_to(self.value(mask), shape).sum())
                if _is_value_dtype(source) and source in self.values:
                    return self._meta_of(self.value(source).masked_select(self.value(mask)))
            return torch.empty(count, dtype=source.dtype, device="meta")
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                    aten._index_put_impl_.default, aten._unsafe_index_put.default):
            args = (args[0], self._bool_indices_to_long(args[1]), *args[2:])
        if func is aten.repeat_interleave.Tensor and _is_meta(args[0]):
            with _disable_current_modes():
                return self._meta_of(torch.repeat_interleave(self.value(args[0])))

        out = func(*args, **kwargs)

        flat_out, _ = tree_flatten(out)
        wanted = [o for o in flat_out if _is_meta(o) and _is_value_dtype(o)]
        mutated = [a for a, schema_arg in zip(args, func._schema.arguments)
                   if schema_arg.alias_info is not None and schema_arg.alias_info.is_write and _is_meta(a)]
        if not wanted and not any(a in self.values for a in mutated):
            return out
        flat_in, _ = tree_flatten((args, kwargs))
        if any(_is_meta(a) and a not in self.values for a in flat_in):
            for a in mutated:  # its copy would be stale now
                self.values.pop(a, None)
            return out

        def to_value(x):
            if _is_meta(x):
                return self.values[x]
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            return x

        with _disable_current_modes():
            value_out = func(*tree_map(to_value, args), **tree_map(to_value, kwargs))
        for o, v in zip(flat_out, tree_flatten(value_out)[0]):
            if _is_meta(o) and _is_value_dtype(o) and isinstance(v, torch.Tensor):
                self.values[o] = v
        return out

    def to_meta(self, batch: dict) -> dict:
        """The batch's tensors on meta (inside this mode, so that the integer ones keep their values)."""
        return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------- attention

class _FlashStyleAttention(torch.autograd.Function):
    """One fused attention op that saves what FlashAttention saves on a GPU: q, k, v (k and v with their own
    heads under grouped-query attention), the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale):
        groups = query.shape[-3] // key.shape[-3]
        k, v = (key, value) if groups == 1 else (key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3))
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(query, k, v, 0.0, is_causal, attn_mask=attn_mask,
                                                                    scale=scale)
        ctx.save_for_backward(query, key, value, attn_mask, out, lse)
        ctx.is_causal, ctx.scale, ctx.groups = is_causal, scale, groups
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, attn_mask, out, lse = ctx.saved_tensors
        g = ctx.groups
        k, v = (key, value) if g == 1 else (key.repeat_interleave(g, -3), value.repeat_interleave(g, -3))
        grad_q, grad_k, grad_v = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), query, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=attn_mask, scale=ctx.scale)
        if g > 1:
            b, h, s, d = key.shape
            grad_k = grad_k.reshape(b, h, g, s, d).sum(2)
            grad_v = grad_v.reshape(b, h, g, s, value.shape[-1]).sum(2)
        return grad_q, grad_k, grad_v, None, None, None


def flash_style_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention through _FlashStyleAttention (no dropout)."""
    if dropout_p:
        raise ValueError("flash_style_sdpa: attention dropout is not supported")
    if key.shape[-3] != query.shape[-3] and not enable_gqa:
        raise ValueError("flash_style_sdpa: key heads differ from query heads without enable_gqa")
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            attn_mask.logical_not(), float("-inf"))
    return _FlashStyleAttention.apply(query, key, value, attn_mask, is_causal, scale)


@contextlib.contextmanager
def flash_style_attention():
    """Route every F.scaled_dot_product_attention call (the encoders' and transformers' sdpa) through
    flash_style_sdpa while the context is open."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = flash_style_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


ATTENTION_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                   aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}


# ----------------------------------------------------------------------------------------------- counting

class ComponentTracker(TorchFunctionMode):
    """Which component is running. In forward: the top-level component of the innermost module whose forward is
    running (global module hooks). In backward: the component whose forward created the autograd node that is
    running now (every node is labelled when the forward creates it: after each torch call, the new nodes
    reachable from its outputs get the component running then). Outside the four components: "other"."""

    def __init__(self, model):
        super().__init__()
        self.component_of_module = {module: COMPONENTS.get(name.split(".")[0], "other") if name else "other"
                                    for name, module in model.named_modules()}
        self.stack: list[str] = []
        self.labels: dict = {}  # autograd node -> component (strong references keep the nodes' identity)
        self._hooks = []

    def __enter__(self):
        def push(module, args):
            self.stack.append(self.component_of_module.get(module, self.forward_component()))

        def pop(module, args, output):
            self.stack.pop()

        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(push),
                       torch.nn.modules.module.register_module_forward_hook(pop)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def forward_component(self) -> str:
        return self.stack[-1] if self.stack else "other"

    def current(self) -> str:
        if torch._C._current_graph_task_id() == -1:
            return self.forward_component()
        node = torch._C._current_autograd_node()
        return self.labels.get(node, "unlabelled") if node is not None else "other"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            component = self.forward_component()
            todo = [o.grad_fn for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.grad_fn is not None]
            while todo:
                node = todo.pop()
                if node is not None and node not in self.labels:
                    self.labels[node] = component
                    todo.extend(n for n, _ in node.next_functions)
        return out


class ComponentFlopCounter(FlopCounterMode):
    """FlopCounterMode (with the attention formulas above) that also sums FLOPs by component and phase as a
    ComponentTracker attributes them. (FlopCounterMode's own per-module table comes from torch's ModuleTracker,
    which in backward leaves a module only when its positional tensor inputs get their gradients, so it counts
    backward ops under several modules at once; it is not used here.)"""

    def __init__(self, tracker: ComponentTracker):
        super().__init__(display=False, custom_mapping=ATTENTION_FLOPS)
        self.tracker = tracker
        self.by_phase = {"forward": defaultdict(int), "backward": defaultdict(int)}

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            self.by_phase[phase][self.tracker.current()] += flops
        return super()._count_flops(func_packet, out, args, kwargs)


def _storage_key(t: torch.Tensor) -> int:
    # the StorageImpl's address: one per storage (also on meta, where every data_ptr is 0), shared by views
    return t.untyped_storage()._cdata


def _with_columns(parts: dict) -> dict:
    row = {name: parts.get(name, 0) for name in COLUMNS[:5]}
    unknown = sorted(set(parts) - set(COLUMNS[:5]))
    if unknown:
        raise RuntimeError(f"FLOPs or bytes outside the known components: {unknown}")
    row["backbone"] = sum(row[name] for name in BACKBONE)
    row["total"] = sum(row[name] for name in COLUMNS[:5])
    return row


def measure_step(model, batch: dict, backward: bool = True) -> dict:
    """FLOPs (forward, backward, step) and saved-activation bytes by component of one training step of `model`
    on `batch` (the batch on the CPU; the model on meta or the CPU). Leaves no gradients behind. Without
    `backward`, the forward only (backward and step FLOPs are then None)."""
    meta = next(model.parameters()).device.type == "meta"
    values = MetaValues() if meta else contextlib.nullcontext()
    tracker = ComponentTracker(model)
    counter = ComponentFlopCounter(tracker)
    param_storages = {_storage_key(p) for p in model.parameters()}
    saved: dict[int, tuple[str, int]] = {}
    keep = []  # saved tensors stay alive until backward anyway; holding them keeps storage keys unique

    def pack(t):
        key = _storage_key(t)
        if key not in param_storages and key not in saved:
            saved[key] = (tracker.forward_component(), t.untyped_storage().nbytes())
            keep.append(t)
        return t

    start = time.perf_counter()
    with values, flash_style_attention(), counter, tracker:
        if meta:
            batch = values.to_meta(batch)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        forward_seconds = time.perf_counter() - start
        forward_global = counter.get_total_flops()
        if backward:
            loss.backward()
    seconds = time.perf_counter() - start
    del loss, keep
    model.zero_grad(set_to_none=True)

    forward = _with_columns(counter.by_phase["forward"])
    if forward["total"] != forward_global:
        raise RuntimeError("component FLOPs do not add up to FlopCounterMode's total")
    backward_flops = step = None
    if backward:
        backward_flops = _with_columns(counter.by_phase["backward"])
        step = {name: forward[name] + backward_flops[name] for name in COLUMNS}
        if step["total"] != counter.get_total_flops():
            raise RuntimeError("component FLOPs do not add up to FlopCounterMode's total")
    activations = defaultdict(int)
    for component, nbytes in saved.values():
        activations[component] += nbytes
    return {"forward_flops": forward, "backward_flops": backward_flops, "step_flops": step,
            "activation_bytes": _with_columns(activations), "forward_seconds": forward_seconds,
            "step_seconds": seconds}


def run_geometry(geometry: str, group_size: int, minutes: float = 6.0, turns: int = 6, text_rate: float = 3.0,
                 backward: bool = True, user_features: bool = True) -> dict:
    """Sequence lengths, FLOPs and activation bytes of one training step of a geometry at group size k, on meta."""
    config, dtype = geometry_config(geometry, group_size)
    model = build_model(config, "meta", dtype)
    batch, layout = conversation(config, minutes, turns, text_tokens_per_second=text_rate, user_features=user_features)
    if batch["input_features"] is not None:
        batch["input_features"] = batch["input_features"].to(dtype)
    result = {"group_size": group_size, **sequence_lengths(config, batch), "dtype": str(dtype).replace("torch.", ""),
              "parameters": sum(p.numel() for p in model.parameters()), "layout": layout}
    result.update(measure_step(model, batch, backward))
    return result


# ----------------------------------------------------------------------------------------------- report

def ratios_to_first(results: list[dict]) -> dict:
    first = results[0]
    out = {}
    for r in results[1:]:
        row = {"llm_sequence_length": r["llm_sequence_length"] / first["llm_sequence_length"],
               "srh_sequence_length": r["srh_sequence_length"] / first["srh_sequence_length"]}
        for measure in ("step_flops", "activation_bytes"):
            row[measure] = {c: r[measure][c] / first[measure][c] if first[measure][c] else None for c in COLUMNS}
        out[f"k{r['group_size']}/k{first['group_size']}"] = row
    return out


def print_table(geometry: str, results: list[dict], ratios: dict) -> None:
    first = results[0]
    short = {"mel_encoder": "mel", "speech_encoder": "tok", "llm": "LLM", "srh": "SRH", "other": "oth",
             "backbone": "bbone", "total": "total"}
    print(f"\n{geometry}: {results[0]['parameters'] / 1e9:.3f}B parameters at k={first['group_size']}, "
          f"{results[0]['dtype']}, {first['layout']['minutes']:g}-minute conversation")
    head = f"{'k':>2} {'LLM len':>7} {'SRH len':>7} | " + " ".join(f"{short[c]:>7}" for c in COLUMNS)
    print(f"{'':>18} | {'training-step TFLOPs (forward + backward)':<55} | activation GB (saved for backward)")
    print(head + " | " + " ".join(f"{short[c]:>7}" for c in COLUMNS))
    for r in results:
        flops = " ".join(f"{r['step_flops'][c] / 1e12:>7.3f}" for c in COLUMNS)
        act = " ".join(f"{r['activation_bytes'][c] / 1e9:>7.3f}" for c in COLUMNS)
        print(f"{r['group_size']:>2} {r['llm_sequence_length']:>7} {r['srh_sequence_length']:>7} | {flops} | {act}")
    print(f"ratios to k={first['group_size']}:")
    for name, row in ratios.items():
        k = name.split("/")[0][1:]

        def fmt(x):
            return f"{x:>7.3f}" if x is not None else f"{'-':>7}"

        flops = " ".join(fmt(row["step_flops"][c]) for c in COLUMNS)
        act = " ".join(fmt(row["activation_bytes"][c]) for c in COLUMNS)
        note = "   <- paper: about half (k=5 vs k=1)" if k == "5" and first["group_size"] == 1 else ""
        print(f"{k:>2} {row['llm_sequence_length']:>7.3f} {row['srh_sequence_length']:>7.3f} | {flops} | {act}{note}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometries", nargs="+", default=["paper_8b", "tiny"], choices=["paper_8b", "tiny"])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[1, 4, 5, 6],
                        help="the first is the denominator of the ratios")
    parser.add_argument("--minutes", type=float, default=6.0, help="length of the one conversation")
    parser.add_argument("--turns", type=int, default=6, help="user + assistant exchanges in it")
    parser.add_argument("--text-tokens-per-second", type=float, default=3.0, help="assistant transcript rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compute.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    record = {"benchmark": "training-step FLOPs and saved activations by component, meta device",
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "method": {"flops": "torch.utils.flop_counter FlopCounterMode (forward + backward; per component by "
                                  "the running module in forward and by the creator of the running autograd node "
                                  "in backward; attention: full S x S, flash-style kernel, backward 2.5 x forward)",
                         "activations": "autograd saved-tensor hooks in one forward, parameters excluded, each "
                                        "storage once; 8B in bfloat16, tiny in float32",
                         "backbone": "+".join(BACKBONE)},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "geometries": {}}
    for geometry in args.geometries:
        results = [run_geometry(geometry, k, args.minutes, args.turns, args.text_tokens_per_second)
                   for k in args.group_sizes]
        ratios = ratios_to_first(results) if len(results) > 1 else {}
        print_table(geometry, results, ratios)
        record["geometries"][geometry] = {"results": results, "ratios": ratios}
    record["wall_seconds"] = time.perf_counter() - start
    print(f"\nwall time {record['wall_seconds']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {args.out}")
    return record


if __name__ == "__main__":
    main()
