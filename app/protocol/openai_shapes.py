"""The OpenAI shapes: chat, completions, models, embeddings."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError

from app.protocol.base import (
    INVALID_VALUE,
    MAX_STATIC_TOKENS,
    RoutingInfo,
    Usage,
    Whole,
    _Lenient,
    _Response,
)
from app.protocol.extensions import (
    _OpenAIGeneration,
)


# --- chat ---------------------------------------------------------------------------------
class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    """`developer` is treated as `system`. Tool and function messages need tools: refused."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, description="accepted; the chat template has no "
                             "place for it")
    tool_calls: None = Field(default=None, description="not supported (400)")
    function_call: None = Field(default=None, description="not supported (400)")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: object) -> object:
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") != "text" for p in content
        ):
            raise PydanticCustomError(INVALID_VALUE, "only text content parts are supported")
        return content

    @field_validator("tool_calls", "function_call", mode="before")
    @classmethod
    def _no_tools(cls, value: object) -> object:
        if value is not None:
            raise PydanticCustomError(INVALID_VALUE, "tool calls are not supported: the model "
                                      "cannot call tools")
        return value

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, role: object) -> object:
        if role in ("tool", "function"):
            raise PydanticCustomError(INVALID_VALUE, f"role {role!r} needs tools, which are not "
                                      "supported")
        return role

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_OpenAIGeneration):
    model_config = ConfigDict(json_schema_extra={  # top_logprobs only with logprobs: true
        "if": {"required": ["top_logprobs"],
               "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
    })

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: Whole(ge=0, le=20) | None = Field(default=None,
                                                    description="needs logprobs: true")

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TopLogprob(BaseModel):
    token: str
    logprob: float  # natural log, <= 0
    bytes: list[int] | None  # UTF-8 of `token`


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # best first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    routing: RoutingInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    routing: RoutingInfo | None = None


# --- completions --------------------------------------------------------------------------
NonEmpty = Annotated[str, StringConstraints(min_length=1)]


TokenIds = Annotated[list[Whole(ge=0)], Field(min_length=1)]


class CompletionRequest(_OpenAIGeneration):
    """`prompt`: a string, strings, the base model's token ids, or lists of them (as vLLM
    accepts; lm-eval's local-completions sends token ids)."""

    model_config = ConfigDict(json_schema_extra={  # max_tokens 0 only with echo: true
        "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
        "then": {"required": ["echo"], "properties": {"echo": {"const": True}}},
    })
    prompt: (NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1)])
    echo: bool | None = Field(default=False, description="return the prompt before the "
                              "completion; with logprobs, the prompt tokens' logprobs too (the "
                              "first is null), under the request's blend")
    logprobs: Whole(ge=0, le=5) | None = None
    max_tokens: Whole(ge=0, le=MAX_STATIC_TOKENS) | None = Field(
        default=None, description="0 only with echo: the prompt's logprobs, nothing generated")

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_logprob_count(self) -> int | None:
        return (self.logprobs or 0) if self.echo else None

    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return self.prompt  # type: ignore[return-value]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]  # per token: up to `logprobs` alternatives
    text_offset: list[int]  # each token's offset in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None
    routing: RoutingInfo | None = None  # with several prompts: how this one was blended


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    routing: RoutingInfo | None = None


# --- models -------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dynamerge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- embeddings ---------------------------------------------------------------------------
class EmbeddingRequest(_Lenient):
    """Strings only, none empty (OpenAI refuses ""). Token arrays get a 400 that says to send
    strings: ids from another tokenizer (tiktoken's, which clients use) would decode to noise
    in the embedder's vocabulary, so accepting them would return wrong vectors silently."""

    input: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)]

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value: object) -> object:
        if isinstance(value, list) and any(
            isinstance(v, int) or (isinstance(v, list) and v and isinstance(v[0], int))
            for v in value
        ):
            raise PydanticCustomError(INVALID_VALUE, "token arrays are not supported: send the "
                                      "input as strings (with langchain's OpenAIEmbeddings, set "
                                      "check_embedding_ctx_length=False)")
        return value
    model: str = "auto"  # any value is accepted: there is one embedder, the router's
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Whole(ge=1) | None = Field(default=None, description="only the embedder's own")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


