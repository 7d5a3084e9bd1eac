"""The two speech encoders of Fun-Audio-Chat: a Whisper-style log-mel encoder with windowed attention,
and the discrete speech-token encoder that groups G tokens (25 Hz) into one LLM position (25/G Hz)."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.activations import ACT2FN

from .configuration import FunAudioChatAudioConfig


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position table [length, channels]: sin in the first half, cos in the second."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class FunAudioChatEncoderAttention(nn.Module):
    """Bidirectional multi-head attention; k has no bias (Whisper)."""

    def __init__(self, config: FunAudioChatAudioConfig):
        super().__init__()
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.d_model // self.num_heads
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=True)
        self.k_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.d_model, bias=True)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=True)

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # hidden_states [N, T, d]; key_mask [N, T] bool, True = a real frame of this chunk
        n, t, d = hidden_states.shape
        q = self.q_proj(hidden_states).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # [N, h, T, hd]
        k = self.k_proj(hidden_states).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(n, t, d)  # [N, T, h*hd]: heads back next to each other
        return self.out_proj(out)


class FunAudioChatEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, config: FunAudioChatAudioConfig):
        super().__init__()
        self.self_attn = FunAudioChatEncoderAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.activation_fn = ACT2FN[config.activation_function]
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.self_attn_layer_norm(hidden_states), key_mask)
        hidden_states = residual + F.dropout(hidden_states, self.dropout, self.training)
        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))
        hidden_states = F.dropout(hidden_states, self.activation_dropout, self.training)
        hidden_states = residual + F.dropout(self.fc2(hidden_states), self.dropout, self.training)
        return hidden_states


def length_buckets(lengths: list[int], buckets: int) -> list[list[int]]:
    """Indices of `lengths` sorted by length and cut into at most `buckets` groups of about equal count, never
    between two equal lengths (padding them apart would save nothing)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, start = [], 0
    for b in range(1, buckets + 1):
        end = back = b * len(order) // buckets
        while start < back < len(order) and lengths[order[back]] == lengths[order[back - 1]]:
            back -= 1  # cut before a run of equal lengths...
        if back > start:
            end = back
        while 0 < end < len(order) and lengths[order[end]] == lengths[order[end - 1]]:
            end += 1  # ...or, where the run starts the group, after it
        if end > start:
            groups.append(order[start:end])
            start = end
    return groups


class FunAudioChatContinuousEncoder(nn.Module):
    """`continuous_audio_tower`: log-mel [M, T] at 100 frames/s -> [n, H] at ~25 frames/s.

    Each audio's valid frames are cut into chunks of 2*n_window frames; every chunk goes through the convolutions,
    the position table (restarting at 0) and the transformer layers as an independent sequence, so attention is
    block-diagonal by chunk. The chunk outputs are concatenated, average-pooled by 2, normalised and projected.
    """

    def __init__(self, config: FunAudioChatAudioConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList([FunAudioChatEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, config.output_dim)
        # Present in the official checkpoint but used by no forward pass; kept so that names and shapes match.
        self.audio_bos_eos_token = nn.Embedding(2, config.output_dim)

    # Chunks run in this many batches of similar length (sorted by length, equal counts), each padded only to its own
    # longest chunk: every chunk is an independent sequence, so the result is the same as one batch padded to the
    # longest chunk of all, and the padding computed for nothing falls (tiny world, clips of 1.6-3.1 s, 32 a batch:
    # 37% of the frames in one batch were padding, 11% in four).
    chunk_buckets = 4

    def _chunks(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor):
        """Every audio's valid frames cut into chunks of 2*n_window frames ([L, M] each), audio by audio."""
        chunk_len = 2 * self.config.n_window
        chunks, audio_of_chunk = [], []
        for a in range(input_features.shape[0]):
            frames = input_features[a][:, feature_attention_mask[a].bool()].transpose(0, 1)  # [L_a, M]
            pieces = frames.split(chunk_len, dim=0)
            chunks.extend(pieces)
            audio_of_chunk.extend([a] * len(pieces))
        return chunks, audio_of_chunk

    def _encode_chunks(self, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks [L_i, M] padded into one batch -> transformer output [N, c2, d] and each chunk's length c2_i."""
        lengths = torch.tensor([c.shape[0] for c in chunks], dtype=torch.long, device=chunks[0].device)
        x = pad_sequence(chunks, batch_first=True).transpose(1, 2)  # [N, M, c]
        frame_mask = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]  # [N, c]
        # conv1 sees zeros past a chunk's end (its padding); its output is masked so conv2 does too.
        x = F.gelu(self.conv1(x)) * frame_mask[:, None, :].to(x.dtype)
        x = F.gelu(self.conv2(x))  # [N, d, (c-1)//2 + 1]
        out_lengths = (lengths - 1) // 2 + 1
        x = x.transpose(1, 2)  # [N, c2, d]
        x = x + sinusoids(x.shape[1], self.config.d_model).to(x)[None]  # positions restart in every chunk
        x = F.dropout(x, self.config.dropout, self.training)
        key_mask = torch.arange(x.shape[1], device=x.device)[None, :] < out_lengths[:, None]  # [N, c2]
        for layer in self.layers:
            x = layer(x, key_mask)
        return x, out_lengths

    def forward(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor, output_length: int
    ) -> torch.Tensor:
        """input_features [A_f, M, T_f], feature_attention_mask [A_f, T_f] -> [A_f, output_length, H].

        Frames past an audio's own length stay zero; longer outputs are truncated to `output_length`.
        """
        num_audios = input_features.shape[0]
        if feature_attention_mask.sum() == 0:
            return input_features.new_zeros(num_audios, output_length, self.config.output_dim)
        chunks, audio_of_chunk = self._chunks(input_features, feature_attention_mask)
        encoded: list[torch.Tensor | None] = [None] * len(chunks)
        for members in length_buckets([c.shape[0] for c in chunks], self.chunk_buckets):
            x, out_lengths = self._encode_chunks([chunks[i] for i in members])
            for row, (i, n) in enumerate(zip(members, out_lengths.tolist())):
                encoded[i] = x[row, :n]

        # Reassemble each audio from its chunks, then average-pool pairs of frames (an odd last frame is dropped).
        frames = torch.cat(encoded)  # [sum of c2, d], chunk-major: chunks were built audio by audio
        frames_per_audio = [0] * num_audios
        for a, chunk in zip(audio_of_chunk, encoded):
            frames_per_audio[a] += chunk.shape[0]
        rows = []
        for audio_frames in frames.split(frames_per_audio, dim=0):
            n = audio_frames.shape[0]
            if n >= 2:
                audio_frames = audio_frames[: n // 2 * 2].view(n // 2, 2, -1).mean(dim=1)  # [n//2, d]
            projected = self.proj(self.ln_post(audio_frames))[:output_length]  # [n_a, H]
            rows.append(F.pad(projected, (0, 0, 0, output_length - projected.shape[0])))
        return torch.stack(rows)  # [A_f, output_length, H]


class FunAudioChatDiscreteEncoder(nn.Module):
    """`audio_tower`: speech tokens [A, L_sp] -> grouped features [A, L_sp/G, H] (mean of G embeddings, then a
    linear layer), optionally replaced by (or added to) the grouped continuous features of the same audio."""

    def __init__(self, config: FunAudioChatAudioConfig):
        super().__init__()
        self.config = config
        hidden = config.output_dim
        self.embed_tokens = nn.Embedding(config.codebook_size, hidden)
        self.output_matching = nn.Linear(hidden, hidden, bias=False)
        self.continual_output_matching = nn.Linear(hidden, hidden, bias=False)

    def group(self, speech_ids: torch.Tensor) -> torch.Tensor:
        """speech_ids [A, Gm*G] -> [A, Gm, H]: the mean over each group's token embeddings, then output_matching."""
        a, length = speech_ids.shape
        g = self.config.group_size
        embeds = self.embed_tokens(speech_ids).view(a, length // g, g, -1)  # [A, Gm, G, H]
        return self.output_matching(embeds.mean(dim=2))

    def forward(
        self,
        speech_ids: torch.Tensor,
        continuous_features: torch.Tensor | None = None,
        feature_exist_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """speech_ids [A, L_sp] (L_sp a multiple of G); continuous_features [A_f, L_sp, H] for the A_f rows where
        feature_exist_mask [A] is True (in order) -> audio features [A, L_sp/G, H]."""
        features = self.group(speech_ids)
        if continuous_features is None:
            return features
        a_f, length, hidden = continuous_features.shape
        g = self.config.group_size
        # Zero frames past an audio's end count in the mean, as in the official code.
        continuous = continuous_features.view(a_f, length // g, g, hidden).mean(dim=2)  # [A_f, Gm, H]
        continuous = self.continual_output_matching(continuous)
        rows = feature_exist_mask.bool()
        if int(rows.sum()) != a_f:
            raise ValueError(
                f"feature_exist_mask marks {int(rows.sum())} audios with features, but input_features holds {a_f}"
            )
        if self.config.continuous_features_mode == "replace":
            return features.masked_scatter(rows[:, None, None], continuous)
        added = torch.zeros_like(features).masked_scatter(rows[:, None, None], continuous)
        return features + added
