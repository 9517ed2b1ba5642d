"""Typed test doubles: a scriptable OpenAI-compatible upstream and a tiny random model.

The upstream is a real FastAPI app served over loopback, so `models/remote.py` speaks real
HTTP to it. The tiny model is a real transformers Llama with a real BPE tokenizer built in
about a second, so `models/local.py` runs its real code path with nothing downloaded.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(out: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama (about 0.2M parameters) with a byte-level BPE tokenizer and ChatML."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        "Hello, how can I help you today?",
        "Your refund will arrive in five business days.",
        "Please reset your password from the account page.",
        "We ship to forty countries; shipping is free over fifty dollars.",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@dataclass
class UpstreamScript:
    """How the fake upstream behaves. Tests mutate it between requests."""

    name: str = "fake-model"
    text: str = "Your refund will arrive in five business days."
    # Per-token logprob; prompts containing HARD get `hard_logprob` (a low-confidence student).
    logprob: float = -0.05
    hard_logprob: float = -3.0
    status: int = 200  # answer this status instead of a completion
    delay_s: float = 0.0
    cut_stream_after: int | None = None  # drop the connection after N content chunks
    echo: bool = False  # answer with `text` followed by the last message (a model that repeats what it read)
    token_delay_s: float = 0.0  # a streamed answer's pause before each content chunk (a model generating)
    token_logprobs: list[float] | None = None  # per-token logprobs, in place of `logprob` (the last repeats)
    streamed: int = 0  # content chunks sent by streams, all told (a stream cut short stops adding)
    requests: list[dict[str, Any]] = field(default_factory=list)
    inflight: int = 0  # requests being answered now, and the most there ever were at once
    peak_inflight: int = 0


def _tokens(text: str) -> list[str]:
    out, word = [], ""
    for ch in text:
        if ch == " " and word:
            out.append(word)
            word = ""
        word += ch
    return out + ([word] if word else [])


def fake_upstream(script: UpstreamScript) -> FastAPI:
    """A small OpenAI-compatible server: /v1/models and /v1/chat/completions (with streaming)."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": script.name, "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        body = await request.json()
        script.requests.append(body)
        if script.delay_s:
            script.inflight += 1
            script.peak_inflight = max(script.peak_inflight, script.inflight)
            try:
                await asyncio.sleep(script.delay_s)
            finally:
                script.inflight -= 1
        if script.status != 200:
            # An echoing upstream repeats the prompt in its error, as some servers' validation errors do.
            message = f"scripted failure: {body['messages'][-1]['content']}" if script.echo else "scripted failure"
            return JSONResponse(
                {"error": {"message": message, "type": "server_error", "param": None, "code": None}},
                status_code=script.status,
            )
        last = body["messages"][-1]["content"]
        lp = script.hard_logprob if "HARD" in last else script.logprob
        k = int(body.get("top_logprobs") or 0)
        answer = f"{script.text} {last}" if script.echo else script.text
        toks = _tokens(answer)[: int(body.get("max_tokens") or 1000)]
        finish = "stop" if len(toks) == len(_tokens(answer)) else "length"

        def entry(t: str, i: int = 0) -> dict[str, Any]:
            schedule = script.token_logprobs
            x = schedule[min(i, len(schedule) - 1)] if schedule and "HARD" not in last else lp
            return {
                "token": t,
                "logprob": x,
                "bytes": list(t.encode()),
                "top_logprobs": [{"token": t, "logprob": x, "bytes": None}][:k],
            }

        usage = {"prompt_tokens": 11, "completion_tokens": len(toks), "total_tokens": 11 + len(toks)}
        base = {"id": "chatcmpl-up", "created": int(time.time()), "model": script.name}
        if not body.get("stream"):
            return {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(toks)},
                        "logprobs": {"content": [entry(t, i) for i, t in enumerate(toks)]}
                        if body.get("logprobs")
                        else None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }

        async def events() -> Any:
            def sse(obj: dict[str, Any]) -> bytes:
                return f"data: {json.dumps(obj)}\n\n".encode()

            ck = {**base, "object": "chat.completion.chunk"}
            yield sse({**ck, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i, t in enumerate(toks):
                if script.cut_stream_after is not None and i >= script.cut_stream_after:
                    raise RuntimeError("scripted cut")  # uvicorn drops the connection mid-stream
                if script.token_delay_s:
                    await asyncio.sleep(script.token_delay_s)
                script.streamed += 1
                lps = {"content": [entry(t, i)]} if body.get("logprobs") else None
                yield sse({**ck, "choices": [{"index": 0, "delta": {"content": t}, "logprobs": lps}]})
            yield sse({**ck, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            yield sse({**ck, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


INTENTS = {
    "refund": "Refunds take five business days.",
    "password": "Reset your password from the account page.",
    "shipping": "Shipping is free over fifty dollars.",
    "cancel": "You can cancel from the orders page.",
}
TEMPLATES = [
    "please help with {w}",
    "question about {w} today",
    "i need {w} info",
    "{w} how does it work",
    "tell me about {w}",
    "my {w} problem",
    "{w} help needed now",
    "what about {w}",
]


def intent_samples(n_per_intent: int = 8, *, start: float = 1000.0, student_version: str = "base") -> list[Any]:
    """Escalation records for a learnable task: each intent word maps to one teacher answer."""
    from distill_loop import Sample
    from models import ChatMessage, Generation, TokenLogprob, Usage

    out = []
    t = start
    for word, answer in INTENTS.items():
        for i, template in enumerate(TEMPLATES[:n_per_intent]):
            t += 1
            draft = Generation(
                "no idea sorry", "stop", Usage(5, 3), "tiny", (), (TokenLogprob("no", -3.0),), student_version
            )
            teacher = Generation(answer, "stop", Usage(5, 6), "teacher", (), (), "t")
            out.append(
                Sample(
                    id=f"{word}-{i}",
                    created_at=t,
                    tenant="key-x",
                    kind="escalation",
                    reason="low_confidence",
                    messages=(ChatMessage("user", template.format(w=word)),),
                    student=draft,
                    confidence=0.1,
                    features={},
                    teacher=teacher,
                    threshold=0.5,
                )
            )
    return out


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A random (non-zero) LoRA adapter for the tiny model: a distinct, loadable student version."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(out)
    return out
