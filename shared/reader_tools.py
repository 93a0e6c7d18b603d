"""Takeoff's per-reader tokenizer routes — POST /tokenize/{reader_id},
/detokenize/{reader_id}, /chat_template/{reader_id} — carried to that reader
over shared.rpc and answered by its own tokenizer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared import keys

Tool = Literal["tokenize", "detokenize", "chat_template"]
MAX_TEXT_CHARS = 200_000
MAX_TOKENS = 100_000


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=MAX_TEXT_CHARS)
    use_chat_template: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int] | list[str] = Field(max_length=MAX_TOKENS, description="Token ids, or token strings.")
    skip_special_tokens: bool = True


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class ChatTemplateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[list[ChatMessage]] | list[ChatMessage] = Field(min_length=1, max_length=256)
    add_generation_prompt: bool = False

    def conversations(self) -> list[list[dict]]:
        batch = self.inputs if isinstance(self.inputs[0], list) else [self.inputs]
        return [[message.model_dump() for message in conversation] for conversation in batch]


REQUESTS: dict[str, type[BaseModel]] = {
    "tokenize": TokenizeRequest,
    "detokenize": DetokenizeRequest,
    "chat_template": ChatTemplateRequest,
}


def inbox(reader_id: str) -> str:
    """Where a reader takes its tokenizer requests."""
    return f"{keys.PREFIX}:reader:{reader_id}:tools"
