"""The LLM boundary: the LlmClient protocol, the openai-SDK adapter and the offline simulator."""

from generator_service.llm.client import Completion, LlmClient, OpenAiLlm

__all__ = ["Completion", "LlmClient", "OpenAiLlm"]
