"""Wire types of the requests we accept, fields in the order of the OpenAI reference.

Responses reuse the `openai` package's own types, so their shape is the SDK's by construction.
Requests tolerate unknown fields and explicit nulls: the zhipuai SDK always sends
`"response_format": null, "thinking": null` and a few fields of its own (`do_sample`, `request_id`...).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Bounds that keep one request from costing unbounded work before the engine's own checks (the context length,
# MAX_REQUEST_BYTES) apply. OpenAI's own limits where it has them (128 tools); generous elsewhere.
MAX_MESSAGES = 1024
MAX_TOOLS = 128
INT64 = 2**63
MIN_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS = 1024  # tokens in one logit_bias (OpenAI documents no bound; each is a tensor entry per step)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: str = "text"
    text: str | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(_Lenient):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function", "observation"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the arguments are constrained to `parameters` (structured outputs)


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


def _named(v: dict[str, Any]) -> dict[str, Any]:
    """`{"name": "..."}`: chat.py looks the name up in a set, so anything else would be a 500, not a 400."""
    if not isinstance(v.get("name"), str):
        raise ValueError("must name a function: {\"name\": \"...\"}")
    return v


def _near_zero_is_greedy(v: float | None) -> float | None:
    # logits / 1e-40 is inf in float32 and sampling would fail; any temperature this small is greedy anyway.
    return 0.0 if v is not None and v < MIN_TEMPERATURE else v


class NamedTool(_Lenient):
    type: Literal["function"] = "function"
    function: dict[str, Any]

    _name = field_validator("function")(_named)


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class JsonSchemaFormat(_Lenient):
    """`response_format.json_schema`; the schema itself is checked by server/structured (a 400 naming its path)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


def _stop_list(v):
    if v is None:
        return v
    stops = [v] if isinstance(v, str) else v
    if len(stops) > 16:
        raise ValueError("at most 16 stop sequences")
    if any(len(s) > 512 for s in stops):
        raise ValueError("each stop sequence must be at most 512 characters")
    return v


def _logit_bias(v: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's shape: {"<token id>": bias in -100..100} (ids are checked against the vocabulary by the backend)."""
    if not v:
        return None
    out = {}
    for key, bias in v.items():
        try:
            token = int(key)
        except ValueError:
            raise ValueError(f"keys must be token ids, got {key!r}") from None
        if not -100 <= bias <= 100:
            raise ValueError(f"the bias of token {token} is {bias}; it must be in -100..100")
        out[token] = float(bias)
    if len(out) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
    return out


class ChatCompletionRequest(_Lenient):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)  # torch generators take 64-bit seeds
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    functions: list[FunctionDef] | None = Field(None, max_length=MAX_TOOLS)
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    user: str | None = None
    # Extensions (vLLM / zhipuai names)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)  # below: logits / penalty overflows
    do_sample: bool | None = None

    _greedy = field_validator("temperature")(_near_zero_is_greedy)
    _bias = field_validator("logit_bias")(_logit_bias)

    @field_validator("function_call")
    @classmethod
    def _function_call(cls, v):
        return _named(v) if isinstance(v, dict) else v

    _stop = field_validator("stop")(_stop_list)


MAX_PROMPTS = 128  # prompts in one legacy completion request (each is a sequence, times n)


def _prompts(v):
    """Not empty, no empty prompt in a list, and a bounded number of prompts."""
    if isinstance(v, list):
        if not v:
            raise ValueError("must not be empty")
        if isinstance(v[0], list):
            if any(not p for p in v):
                raise ValueError("a token-id prompt must not be empty")
            if len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts")
        elif isinstance(v[0], str) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts")
        ids = [t for p in v for t in p] if isinstance(v[0], list) else v if isinstance(v[0], int) else []
        # The vocabulary bound is the backend's to check; this one keeps out what no tokenizer or tensor can hold.
        if any(t < 0 or t >= 2**31 for t in ids):
            raise ValueError("token ids must be between 0 and the vocabulary size")
    return v


class CompletionRequest(_Lenient):
    """POST /v1/completions (legacy): a raw prompt, no chat template."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1, le=16)
    echo: bool | None = False
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    n: int | None = Field(None, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    user: str | None = None
    # Extensions (vLLM names)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)

    _greedy = field_validator("temperature")(_near_zero_is_greedy)
    _bias = field_validator("logit_bias")(_logit_bias)
    _prompt = field_validator("prompt")(_prompts)
    _stop = field_validator("stop")(_stop_list)


class EmbeddingRequest(_Lenient):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# -- /v1/responses ------------------------------------------------------------------------------------------------
# The item kinds are told apart by `type` in server/api/responses_input.py, which also names what is refused, so the
# fields of every kind live in one lenient item type here.


class ContentPart(_Lenient):
    """input_text / output_text carry `text`, refusal `refusal`; other kinds (images, files, audio) are refused."""

    type: str
    text: str | None = None
    refusal: str | None = None


class InputItem(_Lenient):
    """One entry of `input`: a message (whose `type` may be left out), function_call, function_call_output or
    item_reference."""

    type: str | None = None
    id: str | None = Field(None, max_length=128)
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = Field(None, max_length=128)
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None


class ResponsesTool(_Lenient):
    type: str
    name: str | None = Field(None, min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesToolChoice(_Lenient):
    """`{"type": "function", "name": ...}`, or `{"type": "allowed_tools", "mode": ..., "tools": [...]}`."""

    type: str
    name: str | None = None
    mode: Literal["auto", "required"] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)


class TextFormat(_Lenient):
    """`text.format`: text, or json_object / json_schema with the schema's fields beside `type`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: str = "text"
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Lenient):
    effort: str | None = None
    summary: str | None = None


def _bounded_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    # OpenAI's bounds: it is echoed and stored with every response, so it must stay small.
    if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
        raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
    return v


class ResponsesRequest(_Lenient):
    model: str | None = None
    input: str | list[InputItem] | None = Field(None, max_length=MAX_MESSAGES)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    tools: list[ResponsesTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = Field(None, max_length=128)
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Defined by OpenAI but not served here: accepted only when off (responses_input.check_supported says which).
    background: bool | None = None
    background_options: Any = None
    context_management: Any = None
    conversation: Any = None
    include: list[str] | None = None
    max_tool_calls: int | None = None
    moderation: Any = None
    prompt: Any = None
    reasoning: ReasoningConfig | None = None
    top_logprobs: int | None = None
    truncation: str | None = None

    _greedy = field_validator("temperature")(_near_zero_is_greedy)
    _metadata = field_validator("metadata")(_bounded_metadata)
