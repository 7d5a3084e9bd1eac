"""The Speech Refined Head (SRH, `audio_invert_tower`): ungroups each LLM position into G sub-frames and
predicts the 25 Hz speech tokens autoregressively with a small causal Qwen3 stack that keeps its own KV cache."""

import torch
from torch import nn
from transformers import AutoModel
from transformers.cache_utils import Cache

from .configuration import FunAudioChatAudioConfig


class FunAudioChatSpeechRefinedHead(nn.Module):
    """pre_matching (H -> G*H) ungroups; input_matching (H -> h) enters the crq Qwen3 stack (no token embedding);
    output_matching (h -> H) and lm_head (H -> C, tied to the speech-token embedding) give speech logits."""

    def __init__(self, config: FunAudioChatAudioConfig):
        super().__init__()
        self.config = config
        hidden, group = config.output_dim, config.group_size
        crq_config = config.get_crq_config()
        self.pre_matching = nn.Linear(hidden, group * hidden, bias=True)
        self.input_matching = nn.Linear(hidden, crq_config.hidden_size, bias=False)
        self.crq_transformer = AutoModel.from_config(crq_config)
        # The SRH reads continuous inputs only; the official code deletes the stack's token embedding.
        del self.crq_transformer.embed_tokens
        self.output_matching = nn.Linear(crq_config.hidden_size, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, config.codebook_size, bias=False)

    def ungroup(self, conditioning: torch.Tensor) -> torch.Tensor:
        """conditioning [B, S, H] (LLM last hidden + text embedding) -> sub-frames [B, S*G, H]."""
        b, s, h = conditioning.shape
        # pre_matching gives [B, S, G*H]; sub-frame j of position i is its j-th H-sized slice.
        return self.pre_matching(conditioning).view(b, s * self.config.group_size, h)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Cache | None]:
        """inputs_embeds [B, N, H] (sub-frames plus teacher-forcing embeddings) -> speech logits [B, N, C], cache."""
        out = self.crq_transformer(
            inputs_embeds=self.input_matching(inputs_embeds),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        logits = self.lm_head(self.output_matching(out.last_hidden_state))
        return logits, out.cache
