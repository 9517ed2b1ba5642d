"""Configuration for one model backend (one tier).

Pure data: nothing here reads the environment or touches a model. `gateway/settings.py`
builds these from YAML and `TIERGATE_*` variables.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class BackendConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Where the tier runs: "local" = transformers in this process, "remote" = any
    # OpenAI-compatible server (vLLM, a hosted API) over HTTP, "vllm" = a vLLM engine in this
    # process (needs the vllm package), "fake" = scripted answers for demos/tests.
    kind: Literal["local", "remote", "vllm", "fake"] = "local"
    # local: a bundled model name ("smollm2-135m-instruct", "gemma-3-270m") or a path to a
    # transformers model folder. remote: the model name sent upstream (default: the server's first model).
    model: str = "smollm2-135m-instruct"
    # Name reported in the response `model` field and in metrics; defaults to `model`.
    display_name: str | None = None
    # How messages become a prompt: "chat_template" (the tokenizer's), or "transcript"
    # ("Customer: …\nAgent:" lines, for base models with no chat template, stops at a new turn).
    prompt_format: Literal["chat_template", "transcript"] = "chat_template"
    # Text put before every conversation (a system message, or the transcript's preamble).
    # The teacher's knowledge base goes here; the student normally has none.
    system_prompt: str | None = None
    # local: "cpu", "cuda", "cuda:1" or "auto" (CUDA when present).
    device: str = "auto"
    # local: weights dtype. "auto": bfloat16 where the hardware computes in it (CUDA with bf16,
    # CPUs with AVX-512 BF16 or AMX), else float32 (float16 on older CUDA). On an AVX-512 CPU
    # bfloat16 decodes about 1.4x faster than float32; on an AVX2 CPU, which emulates it, a
    # batch of 16 decodes 2-2.7x slower (bench/README.md). vllm: passed to vLLM as is.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # local: most requests decoded together in one running batch (continuous batching: newcomers join at the next step).
    max_batch_size: int = Field(default=16, ge=1, le=512)
    # local: how long the owner thread waits for more requests to fill a batch, in ms.
    batch_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    # local: longest prompt + completion, in tokens; longer prompts are rejected with 400.
    max_model_len: int = Field(default=2048, ge=16)
    # local: keep the KV cache of the prompt's static start (the system prompt and template
    # text before the conversation) and prefill only the rest of each prompt.
    prefix_cache: bool = True
    # remote: base URL including /v1, e.g. http://127.0.0.1:8000/v1.
    url: str | None = None
    # remote: bearer token sent upstream.
    api_key: SecretStr | None = None
    # remote: seconds to open a connection.
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # remote: seconds between bytes from the server; local and vllm: whole-generation deadline.
    read_timeout_s: float = Field(default=60.0, gt=0)
    # remote: most simultaneous connections to the server.
    max_connections: int = Field(default=256, ge=1)
    # remote: ask the server for per-token logprobs (confidence needs them on the student tier).
    request_logprobs: bool = True
    # vllm: extra AsyncEngineArgs, e.g. {"enable_lora": true, "max_lora_rank": 16,
    # "kv_cache_memory_bytes": 134217728, "enforce_eager": true}.
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # fake: the answer text every request gets, and the per-token logprob it reports.
    fake_text: str = "Thank you for contacting us. How can I help?"
    fake_logprob: float = -0.1

    @property
    def name(self) -> str:
        return self.display_name or self.model
