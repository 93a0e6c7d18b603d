"""Reader calls: requests the API addresses to one reader (not to its group's
queue) over shared.rpc. Takeoff's tokenizer routes (/tokenize, /detokenize,
/chat_template/{reader_id}) are answered by that reader's own tokenizer; the
management port's POST /loras/{reader_id} loads an adapter into it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared import defaults, keys

Tool = Literal["tokenize", "detokenize", "chat_template", "load_lora"]
MAX_TEXT_CHARS = defaults.MAX_TEXT_CHARS
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


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_id: str = Field(pattern=defaults.LORA_ID_PATTERN, description="The adapter to load into memory now.")


TOKENIZER_TOOLS = ("tokenize", "detokenize", "chat_template")
REQUESTS: dict[str, type[BaseModel]] = {
    "tokenize": TokenizeRequest,
    "detokenize": DetokenizeRequest,
    "chat_template": ChatTemplateRequest,
    "load_lora": LoadLoraRequest,
}


def inbox(reader_id: str) -> str:
    """Where a reader takes the calls addressed to it."""
    return keys.reader_calls_inbox(reader_id)
