"""LoRA fine-tuning of the student on a run's examples, with the losses in `loss.py`.

The trainer loads its own copy of the base student (the serving copy is never touched), puts
the serving adapter under the name "serving" and the candidate under "candidate" (warm-started
from the serving adapter), trains only the candidate's LoRA weights, and evaluates either one
for the gate. It runs on CPU with the configured torch threads, or on CUDA when present.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_loop.buffer import Example
from distill_loop.config import DistillConfig
from distill_loop.loss import (
    SEG_ANSWER,
    SEG_CHAIN,
    LossWeights,
    answer_ce,
    chain_and_answer_ce,
    split_reasoning,
    token_nll_B_T,
    topk_tail_kl,
)
from distill_loop.metrics import METRICS
from models import BackendConfig, Generation, TokenLogprob, Usage, build_prompt, pick_device

log = logging.getLogger(__name__)
ANCHOR_WEIGHT = 0.5
Progress = Callable[[int, int, float], None]  # (step, total, loss)


@dataclass(frozen=True, slots=True)
class Encoded:
    ids: list[int]
    target_start: int
    segments: list[int]  # per target token: SEG_ANSWER / SEG_CHAIN
    kd_ids: list[list[int]] | None  # per target token: teacher top-k ids (None: no KD)
    kd_logprobs: list[list[float]] | None


@dataclass(frozen=True, slots=True)
class TrainReport:
    steps: int
    examples: int
    first_loss: float
    last_loss: float
    seconds: float
    weights: LossWeights
    kd_examples: int


@dataclass(frozen=True, slots=True)
class EvalResult:
    nll: float  # mean per-token NLL of the reference answers (teacher forcing)
    agreement: float  # mean metric between greedy answers and references
    answers: tuple[str, ...]
    # Per item: the greedy answer as a Generation (with its token logprobs, so the gateway's
    # router can score it as it would a live draft) and its agreement with the reference.
    drafts: tuple[Generation, ...] = ()
    scores: tuple[float, ...] = ()


class StudentTrainer:
    """One training session: base model + serving adapter + a candidate adapter."""

    def __init__(
        self, base_dir: Path, serving_adapter: Path | None, student: BackendConfig, config: DistillConfig
    ) -> None:
        self.config = config
        self.student = student
        self.device = pick_device(config.device)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(self.device)  # type: ignore[arg-type]
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        self.has_serving = serving_adapter is not None
        if serving_adapter is not None:
            self.model: Any = PeftModel.from_pretrained(base, serving_adapter, adapter_name="serving")
            # Warm start: the candidate begins as a copy of the serving adapter.
            self.model.load_adapter(serving_adapter, adapter_name="candidate", is_trainable=True)
        else:
            # LoRA's A matrices start random: seed them, so a run's candidate depends on its data
            # and config alone, not on what else the process drew (a gateway vs a trainer).
            torch.manual_seed(config.lora.seed)
            self.model = get_peft_model(base, lora, adapter_name="candidate")
        self.model.set_adapter("candidate")
        for name, param in self.model.named_parameters():
            param.requires_grad = "lora_" in name and ".candidate." in name

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, ex: Example) -> Encoded:
        tok = self.tokenizer
        prompt = build_prompt(self.student, tok, ex.messages)
        prompt_ids: list[int] = tok(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        kd_ok = (
            self.config.losses.token_kd
            and ex.teacher_ids
            and len(ex.teacher_ids) == len(ex.teacher_logprobs)
            and all(t.top and all(x.token_id is not None for x in t.top) for t in ex.teacher_logprobs)
            and tok.decode(list(ex.teacher_ids), skip_special_tokens=True) == ex.target
        )
        kd_ids: list[list[int]] | None = None
        kd_lps: list[list[float]] | None = None
        if kd_ok:  # same tokenizer as the teacher: learn its exact tokens and distributions
            target_ids = list(ex.teacher_ids)
            segments = [SEG_ANSWER] * len(target_ids)
            kd_ids = [[int(x.token_id) for x in t.top] for t in ex.teacher_logprobs]  # type: ignore[arg-type]
            kd_lps = [[x.logprob for x in t.top] for t in ex.teacher_logprobs]
        else:
            enc = tok(ex.target, add_special_tokens=False, return_offsets_mapping=True)
            target_ids = list(enc["input_ids"])
            segments = [SEG_ANSWER] * len(target_ids)
            split = split_reasoning(ex.target) if (self.config.losses.reasoning and ex.kind == "answer") else None
            if split is not None:
                answer_at = ex.target.rfind(split[1])
                segments = [SEG_ANSWER if start >= answer_at else SEG_CHAIN for start, _ in enc["offset_mapping"]]
        eos = tok.eos_token_id
        if eos is not None:
            target_ids.append(eos)
            segments.append(SEG_ANSWER)
            if kd_ids is not None and kd_lps is not None:
                kd_ids.append([])
                kd_lps.append([])
        return Encoded(prompt_ids + target_ids, len(prompt_ids), segments, kd_ids, kd_lps)

    def _batch(self, encoded: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded tensors; position t predicts token t+1."""
        width = max(len(e.ids) for e in encoded)
        pad = self.tokenizer.pad_token_id
        B, T = len(encoded), width - 1
        ids = torch.full((B, width), pad, dtype=torch.long)
        attn = torch.zeros((B, width), dtype=torch.long)
        segments_B_T = torch.zeros((B, T), dtype=torch.long)
        k = max((len(row) for e in encoded if e.kd_ids for row in e.kd_ids), default=0)
        kd_ids_B_T_K = torch.full((B, T, max(k, 1)), -1, dtype=torch.long)
        kd_lps_B_T_K = torch.zeros((B, T, max(k, 1)), dtype=torch.float32)
        kd_mask_B_T = torch.zeros((B, T), dtype=torch.long)
        for b, e in enumerate(encoded):
            n = len(e.ids)
            ids[b, :n] = torch.tensor(e.ids)
            attn[b, :n] = 1
            for j, seg in enumerate(e.segments):
                segments_B_T[b, e.target_start - 1 + j] = seg
            if e.kd_ids is not None and e.kd_logprobs is not None:
                for j, (row_ids, row_lps) in enumerate(zip(e.kd_ids, e.kd_logprobs, strict=True)):
                    if row_ids:
                        pos = e.target_start - 1 + j
                        kd_ids_B_T_K[b, pos, : len(row_ids)] = torch.tensor(row_ids)
                        kd_lps_B_T_K[b, pos, : len(row_lps)] = torch.tensor(row_lps)
                        kd_mask_B_T[b, pos] = 1
        d = self.device
        return {
            "ids": ids.to(d),
            "attn": attn.to(d),
            "targets_B_T": ids[:, 1:].to(d),
            "segments_B_T": segments_B_T.to(d),
            "kd_ids_B_T_K": kd_ids_B_T_K.to(d),
            "kd_lps_B_T_K": kd_lps_B_T_K.to(d),
            "kd_mask_B_T": kd_mask_B_T.to(d),
        }

    def _logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits_B_L_V = self.model(input_ids=batch["ids"], attention_mask=batch["attn"]).logits
        return torch.log_softmax(logits_B_L_V[:, :-1].float(), dim=-1)

    # -- training ----------------------------------------------------------------------------
    def batch_loss(self, kind: str, batch: dict[str, torch.Tensor], w: LossWeights) -> torch.Tensor:
        logprobs_B_T_V = self._logprobs(batch)
        targets, segments = batch["targets_B_T"], batch["segments_B_T"]
        counted = segments != 0
        if kind == "correction":
            return w.correction * answer_ce(logprobs_B_T_V, targets, counted)
        if kind == "anchor":
            return ANCHOR_WEIGHT * answer_ce(logprobs_B_T_V, targets, counted)
        loss = logprobs_B_T_V.new_zeros(())
        if self.config.losses.answer:
            w_chain = w.chain if self.config.losses.reasoning else w.answer
            loss = loss + chain_and_answer_ce(logprobs_B_T_V, targets, segments, w.answer, w_chain)
        if self.config.losses.token_kd and bool(batch["kd_mask_B_T"].any()):
            loss = loss + w.kd * topk_tail_kl(
                logprobs_B_T_V, batch["kd_ids_B_T_K"], batch["kd_lps_B_T_K"], batch["kd_mask_B_T"]
            )
        return loss

    def train(self, examples: Sequence[Example], weights: LossWeights, progress: Progress | None = None) -> TrainReport:
        cfg = self.config.lora
        rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        groups: dict[str, list[Encoded]] = {}
        kd_examples = 0
        for ex in examples:
            enc = self.encode(ex)
            kd_examples += enc.kd_ids is not None
            groups.setdefault(ex.kind, []).append(enc)
        batches: list[tuple[str, list[Encoded]]] = []
        for _ in range(cfg.epochs):
            for kind, items in groups.items():
                items = items[:]
                rng.shuffle(items)
                batches += [(kind, items[i : i + cfg.batch_size]) for i in range(0, len(items), cfg.batch_size)]
        rng.shuffle(batches)
        batches = batches[: cfg.max_steps]
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        self.model.train()
        start, losses = time.monotonic(), []
        for step, (kind, items) in enumerate(batches, 1):
            loss = self.batch_loss(kind, self._batch(items), weights)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, len(batches), losses[-1])
        self.model.eval()
        return TrainReport(
            steps=len(batches),
            examples=len(examples),
            first_loss=losses[0] if losses else math.nan,
            last_loss=losses[-1] if losses else math.nan,
            seconds=time.monotonic() - start,
            weights=weights,
            kd_examples=kd_examples,
        )

    def save_candidate(self, out: Path) -> Path:
        """Write the candidate adapter; returns the folder holding adapter_config.json."""
        self.model.save_pretrained(out, selected_adapters=["candidate"])
        found = next(p.parent for p in out.rglob("adapter_config.json"))
        return found

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, which: str, examples: Sequence[Example]) -> EvalResult:
        """Held-out NLL and agreement for the "serving" or "candidate" student."""
        if not examples:
            return EvalResult(math.nan, math.nan, ())
        if which == "candidate":
            self.model.set_adapter("candidate")
            return self._evaluate(examples)
        if self.has_serving:
            self.model.set_adapter("serving")
            try:
                return self._evaluate(examples)
            finally:
                self.model.set_adapter("candidate")
        with self.model.disable_adapter():
            return self._evaluate(examples)

    @torch.inference_mode()
    def _evaluate(self, examples: Sequence[Example]) -> EvalResult:
        gate = self.config.gate
        metric = METRICS[gate.metric]
        total_nll, total_tokens, drafts = 0.0, 0, []
        for i in range(0, len(examples), 8):
            chunk = list(examples[i : i + 8])
            batch = self._batch([self.encode(e) for e in chunk])
            nll_B_T = token_nll_B_T(self._logprobs(batch), batch["targets_B_T"])
            mask = batch["segments_B_T"] != 0
            total_nll += float((nll_B_T * mask).sum())
            total_tokens += int(mask.sum())
            drafts += self._greedy(chunk)
        scores = tuple(metric(d.text, e.reference) for d, e in zip(drafts, examples, strict=True))
        return EvalResult(
            total_nll / max(1, total_tokens),
            sum(scores) / len(scores),
            tuple(d.text for d in drafts),
            tuple(drafts),
            scores,
        )

    def _greedy(self, examples: Sequence[Example]) -> list[Generation]:
        tok = self.tokenizer
        prompts = [build_prompt(self.student, tok, e.messages) for e in examples]
        tok.padding_side = "left"
        enc = tok(
            [p.text for p in prompts],
            add_special_tokens=prompts[0].add_special_tokens,
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        out = self.model.generate(
            **enc,
            max_new_tokens=self.config.gate.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_B_T = out.sequences[:, enc["input_ids"].shape[1] :]
        # Logprob of each chosen token under the unmodified distribution, as a live draft has.
        logits_B_T_V = torch.stack(out.logits, dim=1).float()
        chosen_B_T = torch.log_softmax(logits_B_T_V, dim=-1).gather(-1, new_B_T.unsqueeze(-1)).squeeze(-1)
        ends = {tok.eos_token_id, tok.pad_token_id} - {None}
        drafts = []
        for b, prompt in enumerate(prompts):
            ids = new_B_T[b].tolist()
            n = next((t for t, i in enumerate(ids) if i in ends), len(ids))
            text = str(tok.decode(ids[:n], skip_special_tokens=True))
            for stop in prompt.stops:
                if stop in text:  # keep the tokens the cut text still covers
                    text = text.split(stop)[0]
                    n = min(n, len(tok(text, add_special_tokens=False)["input_ids"]))
            lps = tuple(
                TokenLogprob(str(tok.decode([i])), lp, i)
                for i, lp in zip(ids[:n], chosen_B_T[b, :n].tolist(), strict=True)
            )
            drafts.append(
                Generation(
                    text=text.strip(),
                    finish_reason="stop" if n < len(ids) else "length",
                    usage=Usage(int(enc["attention_mask"][b].sum()), n),
                    model=self.student.model,
                    token_ids=tuple(ids[:n]),
                    logprobs=lps,
                )
            )
        return drafts
