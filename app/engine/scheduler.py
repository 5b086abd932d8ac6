"""Iteration-level batching (Orca, vLLM): requests join between decode steps and leave at once.

Every row of the running batch carries its own adapter mix, so requests with different mixes
share each forward pass: that is what makes per-request merging cheap. A new request is
prefilled alone (with its own mix), then joins the batch's shared KV cache; a finished or
cancelled request leaves before the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from app import metrics
from app.engine.batch_cache import BatchCache
from app.engine.blended_lora import BlendBatch, BlendContext
from app.engine.decoding import Sequence
from app.engine.stream import GenerationStream
from app.engine.types import FinishReason, GenerationRequest, TokenEvent

log = logging.getLogger(__name__)


@dataclass
class Job:
    """An admitted request, waiting for the scheduler."""

    request: GenerationRequest
    prompt_ids: list[int]
    rows: list[tuple[int, float]]  # (slot, weight) blended for this request
    stream: GenerationStream
    admitted_at: float


@dataclass
class _Running:
    job: Job
    sequence: Sequence
    first_token_at: float


class Scheduler:
    """Runs on the engine's worker thread; `run` returns when it reads the `None` sentinel."""

    def __init__(
        self,
        model: PreTrainedModel,
        context: BlendContext,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        model_lock: threading.RLock,
        max_batch_size: int,
        on_done: Callable[[Job], None],
    ) -> None:
        self.model = model
        self.context = context
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.model_lock = model_lock
        self.max_batch_size = max_batch_size
        self.on_done = on_done
        self.device = model.device
        self.dtype = model.dtype
        self.running: list[_Running] = []
        self.kv = BatchCache()
        self._blend: BlendBatch | None = None
        self._blend_stale = True

    def run(self, jobs: queue.Queue[Job | None]) -> None:
        while True:
            wanted = self.max_batch_size - len(self.running)
            # Block only when idle; otherwise take what is waiting and keep decoding.
            while wanted > 0:
                try:
                    job = jobs.get() if not self.running else jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._abort_all()
                    return
                self._guarded(job, self._join)
                wanted = self.max_batch_size - len(self.running)
            if self.running:
                try:
                    self._step()
                except Exception:  # a failed forward fails the batch, not the worker
                    log.exception("decode step failed; failing %d requests", len(self.running))
                    for running in self.running:
                        self._finish(running.job, running.sequence, "", (), "error")
                    self.running, self.kv, self._blend_stale = [], BatchCache(), True

    # --- one request joins ----------------------------------------------------------------
    def _join(self, job: Job) -> None:
        metrics.QUEUE_DEPTH.dec()
        metrics.RUNNING_REQUESTS.inc()
        if job.stream.cancelled:
            sequence = self._sequence(job)
            self._finish(job, sequence, "", (), "cancelled")
            return
        sequence = self._sequence(job)
        row_cache = DynamicCache()
        blend = BlendBatch.from_rows([job.rows], self.device, self.dtype)
        logits = self._forward(sequence.all_ids, None, None, row_cache, blend)
        token = sequence.sampler(sequence.all_ids, logits)
        now = time.perf_counter()
        metrics.TIME_TO_FIRST_TOKEN.observe(now - job.admitted_at)
        delta, finish = sequence.accept(token)
        if finish is not None:
            self._finish(job, sequence, delta, (token,), finish, first_token_at=now)
            return
        if delta:
            job.stream.put(TokenEvent(delta, (token,)))
        self.kv.append(row_cache, len(job.prompt_ids))
        self.running.append(_Running(job, sequence, now))
        self._blend_stale = True

    def _sequence(self, job: Job) -> Sequence:
        return Sequence(job.request, job.prompt_ids, self.tokenizer, self.eos_ids, self.device)

    # --- one decode step for the whole batch ------------------------------------------------
    def _step(self) -> None:
        self._drop_cancelled()
        if not self.running:
            return
        if self._blend_stale:
            self._blend = BlendBatch.from_rows(
                [r.job.rows for r in self.running], self.device, self.dtype
            )
            self._blend_stale = False
        last = torch.tensor([[r.sequence.last_token] for r in self.running], device=self.device)
        # The input token sits at position (sequence length - 1) of its own row, padding aside.
        positions = torch.tensor(
            [[r.sequence.length - 1] for r in self.running], device=self.device
        )
        mask = self.kv.step_mask()
        logits = self._forward(last, mask, positions, self.kv.cache, self._blend)
        metrics.BATCH_SIZE.observe(len(self.running))
        keep = []
        for b, running in enumerate(self.running):
            sequence = running.sequence
            token = sequence.sampler(sequence.all_ids, logits[b : b + 1])
            delta, finish = sequence.accept(token)
            if finish is None:
                if delta:
                    running.job.stream.put(TokenEvent(delta, (token,)))
                keep.append(b)
            else:
                self._finish(running.job, sequence, delta, (token,), finish,
                             first_token_at=running.first_token_at)
        self._keep(keep)

    def _drop_cancelled(self) -> None:
        keep = []
        for b, running in enumerate(self.running):
            if running.job.stream.cancelled:
                self._finish(running.job, running.sequence, "", (), "cancelled",
                             first_token_at=running.first_token_at)
            else:
                keep.append(b)
        self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.running):
            return
        self.kv.keep(rows)
        self.running = [self.running[b] for b in rows]
        self._blend_stale = True

    @torch.inference_mode()
    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DynamicCache,
        blend: BlendBatch | None,
    ) -> torch.Tensor:
        with self.model_lock:
            self.context.batch = blend
            try:
                out = self.model(
                    input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, past_key_values=cache, use_cache=True,
                    # Only the last position is sampled: skip the LM head on the other prompt
                    # tokens (a fifth of a prefill's FLOPs for this vocabulary).
                    logits_to_keep=1,
                )
            finally:
                self.context.batch = None
        return out.logits[:, -1]

    # --- leaving --------------------------------------------------------------------------
    def _finish(
        self,
        job: Job,
        sequence: Sequence,
        text: str,
        token_ids: tuple[int, ...],
        reason: FinishReason,
        first_token_at: float | None = None,
    ) -> None:
        completion = sequence.completion_tokens
        done = time.perf_counter()
        metrics.PROMPT_TOKENS.inc(len(job.prompt_ids))
        metrics.GENERATION_TOKENS.inc(completion)
        metrics.E2E_LATENCY.observe(done - job.admitted_at)
        if first_token_at is not None and completion > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((done - first_token_at) / (completion - 1))
        metrics.FINISHED.labels(reason=reason).inc()
        metrics.RUNNING_REQUESTS.dec()
        self.on_done(job)  # before the last event: whoever sees it sees the slots released
        job.stream.put(TokenEvent(
            text, token_ids, finish_reason=reason,
            prompt_tokens=len(job.prompt_ids), completion_tokens=completion,
        ))

    def _guarded(self, job: Job, action: Callable[[Job], None]) -> None:
        """One bad request must not take the worker, or the batch, down with it."""
        try:
            action(job)
        except Exception:
            log.exception("request %s failed", job.request.request_id)
            self._finish(job, self._sequence(job), "", (), "error")

    def _abort_all(self) -> None:
        for running in self.running:
            self._finish(running.job, running.sequence, "", (), "cancelled")
        self.running = []
        self.kv = BatchCache()
