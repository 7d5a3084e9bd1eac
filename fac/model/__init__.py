"""The Fun-Audio-Chat (DRSR) model: configs, modeling, generation, input processing and builders.
Importing this package registers `funaudiochat` with transformers' AutoConfig and AutoModel."""

from transformers import AutoConfig, AutoModel

from .builders import build_config, paper_8b_config, resolve_geometry
from .configuration import FunAudioChatAudioConfig, FunAudioChatConfig
from .generation import FunAudioChatGenerateOutput
from .modeling import (
    FunAudioChatForConditionalGeneration,
    FunAudioChatOutput,
    FunAudioChatPreTrainedModel,
    check_checkpoint,
    load_checkpoint,
)

AutoConfig.register(FunAudioChatAudioConfig.model_type, FunAudioChatAudioConfig, exist_ok=True)
AutoConfig.register(FunAudioChatConfig.model_type, FunAudioChatConfig, exist_ok=True)
AutoModel.register(FunAudioChatConfig, FunAudioChatForConditionalGeneration, exist_ok=True)

__all__ = [
    "FunAudioChatAudioConfig",
    "FunAudioChatConfig",
    "FunAudioChatForConditionalGeneration",
    "FunAudioChatGenerateOutput",
    "FunAudioChatOutput",
    "FunAudioChatPreTrainedModel",
    "build_config",
    "check_checkpoint",
    "load_checkpoint",
    "resolve_geometry",
    "paper_8b_config",
]
