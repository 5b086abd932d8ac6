"""Iteration-level scheduling (Orca, vLLM) with batched, chunked prefill (Sarathi).

Every row carries its own adapter mix, so requests with different mixes share each forward
pass. One engine step:

1. decodes one token for every running row (one forward pass over the KV pool's slots, where
   rows join and leave without moving anyone else's states: `kv_pool`);
2. spends the rest of the step's token budget (`max_step_tokens`, one token per running row)
   on prefill: prompts that are partly prefilled first, then waiting ones, all of them in ONE
   forward pass, each row with its own mix; a prompt longer than the budget is prefilled in
   chunks over several steps, so running streams keep their pace;
3. moves rows whose prompt is complete into the running batch, with their first token.

The blend is linear per row and padding is masked, so a request's output never depends on
the rows it shares a pass with, nor on how its prompt was chunked.

Failure isolation: a request finishes exactly once, in `_finish`, after it has left every
collection of the scheduler. A failed forward fails the rows of that forward only; a failed
sampling, detokenising or stop check fails that row only. An error that escapes a step (a bug
in the scheduler itself) reaches the engine, which fails everything once and marks itself dead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from app import metrics
from app.engine.batch_cache import RowCache, split_rows, stack_rows
from app.engine.blended_lora import BlendBatch, BlendContext
from app.engine.decoding import ConstraintFactory, Sequence
from app.engine.kv_pool import SlotPool, decode_attention_mask, pool_for
from app.engine.lean_decode import LeanDecoder
from app.engine.prefix_cache import PrefixCache, blend_key
from app.engine.stream import GenerationStream
from app.engine.types import (
    EngineError,
    FinishReason,
    GenerationError,
    GenerationRequest,
    RequestCancelledError,
    TokenEvent,
    TokenLogprob,
)

log = logging.getLogger(__name__)
_MIN_PREFILL_TOKENS = 16  # prefill progresses even when running rows use the whole budget
_DECODE_PHASES = ("blend", "inputs", "forward", "sample", "advance", "bookkeeping")


@dataclass(eq=False)
class Job:
    """An admitted request.

    It reaches the scheduler at once; it may start only once it is `placed`: its adapters are
    resident and pinned, and `rows` holds their (slot, weight) pairs. A job that cannot be
    placed gets `placement_error`, and the scheduler finishes it with that error.
    """

    request: GenerationRequest
    prompt_ids: list[int]
    stream: GenerationStream
    admitted_at: float
    rows: list[tuple[int, float]] = field(default_factory=list)
    placed: bool = False
    placement_error: EngineError | None = None
    started: bool = False  # the scheduler took it into a batch
    finished: bool = False  # set by the one place that finishes a job


WAKE = object()  # put on the job queue to wake an idle scheduler (a placement happened)
_IDLE_POLL_S = 0.05  # how often an idle scheduler with unplaced jobs looks for cancellations


@dataclass(eq=False)
class _Active:
    """A job the scheduler has started: prefilling (with `cache`) or decoding (in the batch)."""

    job: Job
    sequence: Sequence
    cache: RowCache | None = None  # the prompt's states so far, while it is being prefilled
    first_token_at: float | None = None
    slot: int | None = None  # its row in the KV pool, reserved when it starts
    cached: int = 0  # prompt tokens whose states came from the prefix cache
    key: str = ""  # its blend's prefix-cache key
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # echo: filled by prefill


class Scheduler:
    """Runs on the engine's worker thread; `run` returns when it reads the `None` sentinel.

    Args:
        model: the base model with blended layers installed.
        context: where a forward pass finds its rows' mixes.
        tokenizer: the base model's tokenizer.
        eos_ids: tokens that end a sequence.
        model_lock: held by every forward pass (adapter slots are written under it).
        max_batch_size: rows decoding or prefilling at once.
        max_step_tokens: token budget of one step (decode rows count one each).
        on_done: called once per job when it finishes, before its final event.
        constraint_for: builds a request's output constraint (JSON mode), or None.
        prefill_threads: torch threads for prefill forwards (None: the thread's own).
        pool: the KV slots of running rows (None: `max_batch_size` slots of the model's
            context).
        prefix_cache: prompt states kept for reuse (None: no prefix caching).
        lean: the lean decode forward (None: decode steps run transformers' forward).
        decode_threads: called before each decode forward, returns its torch threads (None:
            the thread's own).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        context: BlendContext,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        model_lock: threading.RLock,
        max_batch_size: int,
        max_step_tokens: int,
        on_done: Callable[[Job], None],
        constraint_for: ConstraintFactory | None = None,
        prefill_threads: int | None = None,
        pool: SlotPool | None = None,
        prefix_cache: PrefixCache | None = None,
        lean: LeanDecoder | None = None,
        decode_threads: Callable[[], int] | None = None,
    ) -> None:
        self.model = model
        self.context = context
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.model_lock = model_lock
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.on_done = on_done
        self.constraint_for = constraint_for
        self.prefill_threads = prefill_threads
        self.decode_threads = decode_threads
        self.device = model.device
        self.dtype = model.dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.waiting: list[Job] = []  # admitted, not started (placed or not yet)
        self.prefilling: list[_Active] = []  # started, prompt not complete
        self.running: list[_Active] = []  # rows of the decode batch (each in its slot)
        self.pool = pool if pool is not None else pool_for(model, max_batch_size)
        self.prefix = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self._blend: BlendBatch | None = None
        self._blend_stale = True
        self.lean = lean

    # --- the loop -------------------------------------------------------------------------
    def run(self, jobs: queue.Queue) -> None:
        """Step until the `None` sentinel; `WAKE` markers only wake the loop."""
        while self._take(jobs):
            self.step()
        self.fail_everything(RequestCancelledError("the engine shut down"), "cancelled")

    @property
    def active(self) -> int:
        """Requests started and not finished (prefilling or decoding)."""
        return len(self.prefilling) + len(self.running)

    def _actionable(self) -> bool:
        """Whether a step would do anything (otherwise the loop blocks on the queue)."""
        return bool(self.prefilling or self.running) or any(
            j.placed or j.placement_error is not None or j.stream.cancelled
            for j in self.waiting
        )

    def _take(self, jobs: queue.Queue) -> bool:
        """Move new jobs to `waiting`; block only when there is nothing to do. False when the
        shutdown sentinel arrives."""
        while True:
            try:
                if self._actionable():
                    job = jobs.get_nowait()
                elif self.waiting:  # only unplaced jobs: wait for a placement or a cancel
                    job = jobs.get(timeout=_IDLE_POLL_S)
                else:
                    job = jobs.get()
            except queue.Empty:
                return True
            if job is None:
                return False
            if job is not WAKE:
                self.waiting.append(job)

    def step(self) -> None:
        """One engine step: drop cancelled rows, decode the batch, prefill within the budget."""
        self._drop_cancelled()
        if self.running:
            self._decode()
        if self.waiting or self.prefilling:
            self._prefill()
        metrics.RUNNING_REQUESTS.set(self.active)

    # --- decode ---------------------------------------------------------------------------
    def _decode(self) -> None:
        # Phase timers (a clock read and a histogram observation each, ~25 us a step).
        started = time.perf_counter()
        # One row per slot 0..hi-1; a free slot in between decodes a pad token, ignored.
        hi = max(r.slot for r in self.running) + 1  # type: ignore[type-var]
        by_slot: list[_Active | None] = [None] * hi
        for r in self.running:
            by_slot[r.slot] = r  # type: ignore[index]
        if self._blend_stale:
            self._blend = BlendBatch.from_rows(
                [r.job.rows if r is not None else [] for r in by_slot], self.device, self.dtype
            )
            self._blend_stale = False
        blended = time.perf_counter()
        last = torch.tensor([r.sequence.last_token if r is not None else self.pad_id
                             for r in by_slot], device=self.device)
        # The input token sits at position (sequence length - 1) of its own row.
        positions = torch.tensor([r.sequence.length - 1 if r is not None else 0
                                  for r in by_slot], device=self.device)
        rows = [r.slot for r in self.running]  # type: ignore[misc]
        self._set_decode_threads()
        prepared = time.perf_counter()
        try:
            if self.lean is not None:
                _, lens = self.pool.begin_decode(hi, views=False)
                logits = self._lean_decode(last, positions, lens, rows)
            else:
                mask, lens = self.pool.begin_decode(hi)
                mask = decode_attention_mask(self.model.config, mask, lens)
                logits = self._forward(last[:, None], mask, positions[:, None],
                                       self.pool.cache, self._blend, "decode")[rows]
        except Exception as exc:
            log.exception("decode step failed; failing its %d rows", len(self.running))
            failed, self.running = self.running, []
            self._blend_stale = True
            for active in failed:
                self._finish(active, "error", error=_failed("the decode step", exc))
            return
        forwarded = time.perf_counter()
        self.pool.end_decode(hi)
        metrics.BATCH_SIZE.observe(len(self.running))
        greedy = _batch_argmax(self.running, logits)
        sampled = time.perf_counter()
        keep, leaving = [], []
        for b, active in enumerate(self.running):
            outcome = self._advance(active, logits[b : b + 1], None if greedy is None
                                    else greedy[b])
            if outcome is None:
                keep.append(b)
            else:
                leaving.append((active, outcome))
        advanced = time.perf_counter()
        self._keep(keep)
        for active, (reason, text, tokens, logprobs, error) in leaving:
            self._finish(active, reason, text, tokens, logprobs, error)
        marks = (started, blended, prepared, forwarded, sampled, advanced, time.perf_counter())
        for phase, begin, end in zip(_DECODE_PHASES, marks, marks[1:], strict=False):
            metrics.DECODE_PHASE_SECONDS.labels(phase=phase).observe(end - begin)

    def _set_decode_threads(self) -> None:
        """The decode's torch threads for this step (fixed, or chosen by the policy from how
        busy the cores were: `threads.DecodeThreads`)."""
        if self.decode_threads is None:
            return
        n = self.decode_threads()
        if n != torch.get_num_threads():
            torch.set_num_threads(n)  # ~0.05 ms
        metrics.DECODE_THREADS.set(n)

    # --- prefill --------------------------------------------------------------------------
    def _prefill(self) -> None:
        chosen = self._plan_prefill()
        if not chosen:
            return
        rows = [active for active, _ in chosen]
        try:
            logits, caches = self._prefill_forward(chosen)
        except Exception as exc:
            log.exception("prefill failed; failing its %d rows", len(rows))
            self.prefilling = [a for a in self.prefilling if a not in rows]
            for active in rows:
                self._finish(active, "error", error=_failed("the prefill", exc))
            return
        joining: list[_Active] = []
        leaving = []
        for b, (active, take) in enumerate(chosen):
            active.cache = caches[b]
            active.sequence.prefilled += take
            if active.sequence.prompt_left > 0:
                continue
            self._join(active)  # before leaving `prefilling`: if it raises, the row is failed
            self.prefilling.remove(active)
            now = time.perf_counter()
            active.first_token_at = now
            metrics.TIME_TO_FIRST_TOKEN.observe(now - active.job.admitted_at)
            sampling = active.job.request.sampling
            if sampling.prompt_logprobs is not None:
                prompt = active.sequence.prompt_ids
                active.job.stream.put(TokenEvent(
                    "", (), prompt_ids=tuple(prompt), prompt_text=self.tokenizer.decode(prompt),
                    prompt_logprobs=tuple(active.prompt_logprobs)))
            if sampling.max_tokens == 0:  # the prompt's logprobs were all it asked for
                leaving.append((active, ("length", "", (), (), None)))
                continue
            outcome = self._advance(active, logits[b : b + 1], None)
            if outcome is None:
                joining.append(active)
            else:
                leaving.append((active, outcome))
        if joining:
            self.running.extend(joining)
            self._blend_stale = True
        for active, (reason, text, tokens, logprobs, error) in leaving:
            self._finish(active, reason, text, tokens, logprobs, error)

    def _plan_prefill(self) -> list[tuple[_Active, int]]:
        """(row, prompt tokens to prefill now): partial prompts first, then waiting jobs,
        within the step's token budget and the batch size."""
        budget = max(self.max_step_tokens - len(self.running), _MIN_PREFILL_TOKENS)
        # A full pool makes jobs wait here (the queue limit answers 429 beyond that).
        room = min(self.max_batch_size - len(self.running) - len(self.prefilling),
                   self.pool.free)
        for job in list(self.waiting):
            if job.stream.cancelled:
                self.waiting.remove(job)
                self._finish_job(job, None, "cancelled",
                                 error=RequestCancelledError("the request was cancelled"))
                continue
            if job.placement_error is not None:
                self.waiting.remove(job)
                self._finish_job(job, None, "error", error=job.placement_error)
                continue
            if not job.placed or room <= 0:
                continue
            self.waiting.remove(job)
            try:
                constraint = self.constraint_for(job.request) if self.constraint_for else None
                sequence = Sequence(job.request, job.prompt_ids, self.tokenizer, self.eos_ids,
                                    self.device, constraint)
            except Exception as exc:
                log.exception("request %s could not start", job.request.request_id)
                self._finish_job(job, None, "error", error=_failed("starting it", exc))
                continue
            job.started = True
            active = _Active(job, sequence, slot=self.pool.allocate(),
                             key=blend_key(job.request.merge, job.stream.admission.blend))
            if job.request.sampling.prompt_logprobs is None:  # echo needs every position
                self._reuse_prefix(active)
            self.prefilling.append(active)
            metrics.QUEUE_DEPTH.dec()
            room -= 1
        chosen = []
        for active in self.prefilling:
            if budget <= 0:
                break
            take = min(active.sequence.prompt_left, budget)
            chosen.append((active, take))
            budget -= take
        return chosen

    def _prefill_forward(
        self, chosen: list[tuple[_Active, int]]
    ) -> tuple[torch.Tensor, list[RowCache]]:
        """One forward over the chosen prompt chunks, left-padded: each row's cached part,
        then its chunk, so that every row's last token is in the last column."""
        cache, past = stack_rows([a.cache for a, _ in chosen], self.device)
        width = max(take for _, take in chosen)
        ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(chosen), width, dtype=torch.long)
        positions = torch.zeros(len(chosen), width, dtype=torch.long)
        for b, (active, take) in enumerate(chosen):
            start = active.sequence.prefilled
            ids[b, width - take:] = torch.tensor(active.sequence.prompt_ids[start:start + take])
            mask[b, width - take:] = 1
            positions[b, width - take:] = torch.arange(start, start + take)
        mask = torch.cat([past, mask.to(self.device)], dim=1)
        blend = BlendBatch.from_rows([a.job.rows for a, _ in chosen], self.device, self.dtype)
        # Rows that echo their prompt's logprobs need every position's logits (the whole
        # chunk's LM head); the others need only the last.
        scoring = [b for b, (a, _) in enumerate(chosen)
                   if a.job.request.sampling.prompt_logprobs is not None]
        threads = torch.get_num_threads()
        if self.prefill_threads is not None:
            torch.set_num_threads(self.prefill_threads)  # cheap: ~0.05 ms
        try:
            logits = self._forward(ids.to(self.device), mask, positions.to(self.device), cache,
                                   blend, "prefill", bool(scoring))  # every position
        finally:
            torch.set_num_threads(threads)
        if scoring:
            for b in scoring:
                active, take = chosen[b]
                _score_prompt(active, logits[b, width - take:], active.sequence.prefilled)
            logits = logits[:, -1]
        metrics.PREFILL_TOKENS_PER_STEP.observe(sum(take for _, take in chosen))
        return logits, split_rows(cache, mask)

    # --- one row's token ------------------------------------------------------------------
    def _advance(
        self, active: _Active, logits: torch.Tensor, greedy: int | None
    ) -> tuple[FinishReason, str, tuple[int, ...], tuple[TokenLogprob, ...],
               EngineError | None] | None:
        """Sample, record and stream one token. Returns how the row finishes, or None if it
        goes on. A failure here (NaN logits, a detokenizer or stop-check error) fails this
        row alone."""
        sequence = active.sequence
        try:
            if greedy is not None:
                token, logprob = greedy, None
            else:
                if not torch.isfinite(logits).any():
                    raise GenerationError("the model produced no finite logits")
                token, logprob = sequence.choose(logits)
            delta, finish = sequence.accept(token)
        except Exception as exc:
            log.exception("request %s failed while sampling", active.job.request.request_id)
            error = exc if isinstance(exc, EngineError) else _failed("sampling", exc)
            return "error", "", (), (), error
        logprobs = () if logprob is None else (logprob,)
        if finish is not None:
            return finish, delta, (token,), logprobs, None
        # An event per token, even one whose text is empty (a special token generated with
        # ignore_eos, a held-back stop-string prefix, part of a UTF-8 character): streamed
        # chunks then count what usage.completion_tokens counts.
        active.job.stream.put(TokenEvent(delta, (token,), logprobs=logprobs))
        return None

    def _drop_cancelled(self) -> None:
        keep, gone = [], []
        for b, active in enumerate(self.running):
            (gone if active.job.stream.cancelled else keep).append(b)
        if gone:
            leaving = [self.running[b] for b in gone]
            self._keep(keep)
            for active in leaving:
                self._finish(active, "cancelled")
        cancelled = [a for a in self.prefilling if a.job.stream.cancelled]
        if cancelled:
            self.prefilling = [a for a in self.prefilling if not a.job.stream.cancelled]
            for active in cancelled:
                self._finish(active, "cancelled")

    def _keep(self, rows: list[int]) -> None:
        """Keep only `rows` of `running`; the others' slots are freed by `_finish` (nobody's
        states move)."""
        if len(rows) == len(self.running):
            return
        self.running = [self.running[b] for b in rows]
        self._blend_stale = True

    # --- KV: prefix reuse, joining the pool, leaving it -----------------------------------
    def _reuse_prefix(self, active: _Active) -> None:
        """Start a prompt from its longest cached prefix under its own blend (at least its
        last token is prefilled: its logits give the first output token)."""
        prompt = active.sequence.prompt_ids
        metrics.PREFIX_CACHE_QUERIES.inc(len(prompt))
        layers = self.prefix.lookup(active.key, prompt, len(prompt) - 1)
        if layers is None:
            return
        n = layers[0][0].shape[2]
        active.cache = RowCache(layers=layers, mask=torch.ones(n, dtype=torch.long,
                                                               device=self.device))
        active.sequence.prefilled = active.cached = n
        metrics.PREFIX_CACHE_HITS.inc(n)

    def _join(self, active: _Active) -> None:
        """Copy a prefilled prompt's states (its real columns only) into its slot, and keep
        them in the prefix cache for the next request with the same start and blend."""
        assert active.cache is not None and active.slot is not None
        real = active.cache.mask.bool()
        layers = [(k[0][:, real], v[0][:, real]) for k, v in active.cache.layers]
        active.cache = None
        self.pool.write(active.slot, layers)
        self.prefix.insert(active.key, active.sequence.prompt_ids, layers)

    def _leave(self, active: _Active, keep_states: bool) -> None:
        """Free a row's slot; a row that finished well leaves its prompt and generated
        tokens' states to the prefix cache (a conversation's next turn starts from them)."""
        if active.slot is None:
            return
        slot, active.slot = active.slot, None
        tokens = self.pool.lens[slot]
        if keep_states and tokens and self.prefix.enabled:
            self.prefix.insert(active.key, active.sequence.token_ids[:tokens],
                               self.pool.read(slot, tokens))
        self.pool.release(slot)

    @torch.inference_mode()
    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | dict[str, torch.Tensor],
        position_ids: torch.Tensor,
        cache: Cache | None,
        blend: BlendBatch | None,
        phase: str,
        every_position: bool = False,
    ) -> torch.Tensor:
        """The last position's logits [batch, vocab]; every position's [batch, seq, vocab]
        with `every_position`."""
        with self.model_lock:
            self.context.batch = blend
            started = time.perf_counter()
            try:
                out = self.model(
                    input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, cache=cache, use_cache=True,
                    # Only the last position is sampled: skip the LM head on the other prompt
                    # tokens (a fifth of a prefill's FLOPs for this vocabulary).
                    logits_to_keep=0 if every_position else 1,
                )
                if self.device.type == "cuda":
                    # The sampler waits for the logits anyway; waiting here makes the metric
                    # the forward's time, not its launch's.
                    torch.cuda.synchronize(self.device)
                metrics.FORWARD_SECONDS.labels(phase=phase).observe(time.perf_counter() - started)
            finally:
                self.context.batch = None
        return out.logits if every_position else out.logits[:, -1]

    @torch.inference_mode()
    def _lean_decode(self, last: torch.Tensor, positions: torch.Tensor, lens: torch.Tensor,
                     sampled: list[int]) -> torch.Tensor:
        """A decode step by the lean forward: the sampled rows' logits [rows, vocab]."""
        assert self.lean is not None
        with self.model_lock:
            started = time.perf_counter()
            logits = self.lean.decode(last, positions, self.pool.layers, lens, self._blend,
                                      sampled)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            metrics.FORWARD_SECONDS.labels(phase="decode").observe(time.perf_counter()
                                                                   - started)
        return logits

    # --- leaving --------------------------------------------------------------------------
    def _finish(
        self,
        active: _Active,
        reason: FinishReason,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] = (),
        error: EngineError | None = None,
    ) -> None:
        """Finish a started row; the caller has already removed it from every collection."""
        if reason == "cancelled" and error is None:
            error = RequestCancelledError("the request was cancelled before it finished")
        self._leave(active, keep_states=reason in ("stop", "length"))
        self._finish_job(active.job, active, reason, text, token_ids, logprobs, error)

    def _finish_job(
        self,
        job: Job,
        active: _Active | None,
        reason: FinishReason,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] = (),
        error: EngineError | None = None,
    ) -> None:
        """The one place a job ends: metrics, release (slots, in-flight), then the final
        event. A second call for the same job is a bug: logged and ignored."""
        if job.finished:
            log.error("request %s finished twice (%s); ignoring the second", job.request
                      .request_id, reason)
            return
        job.finished = True
        if active is None:
            metrics.QUEUE_DEPTH.dec()  # it never left the queue
        completion = active.sequence.completion_tokens if active is not None else 0
        done = time.perf_counter()
        metrics.PROMPT_TOKENS.inc(len(job.prompt_ids) if active is not None else 0)
        metrics.GENERATION_TOKENS.inc(completion)
        metrics.E2E_LATENCY.observe(done - job.admitted_at)
        first = active.first_token_at if active is not None else None
        if first is not None and completion > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((done - first) / (completion - 1))
        metrics.FINISHED.labels(reason=reason).inc()
        try:
            self.on_done(job)  # before the last event: whoever sees it sees the slots released
        finally:
            job.stream.put(TokenEvent(
                text, token_ids, finish_reason=reason, prompt_tokens=len(job.prompt_ids),
                completion_tokens=completion, logprobs=logprobs, error=error,
                cached_tokens=active.cached if active is not None else 0,
            ))

    def fail_everything(self, error: EngineError, reason: FinishReason = "error") -> None:
        """Finish every job the scheduler holds, once each (shutdown, or a dead engine)."""
        waiting, prefilling, running = list(self.waiting), self.prefilling, self.running
        self.waiting, self.prefilling, self.running = [], [], []
        self._blend_stale = True
        for job in waiting:
            self._finish_job(job, None, reason, error=error)
        for active in prefilling + running:
            self._finish(active, reason, error=error)
        metrics.RUNNING_REQUESTS.set(0)


def _score_prompt(active: _Active, logits: torch.Tensor, start: int) -> None:
    """Record the logprobs of the prompt tokens that a chunk's positions predict: `logits`
    [take, vocab] are those of prompt positions start..start+take-1, and position p predicts
    prompt token p+1 (the chunk's last position may predict the first generated token)."""
    prompt = active.sequence.prompt_ids
    n = min(logits.shape[0], len(prompt) - 1 - start)
    if n <= 0:
        return
    logprobs = torch.log_softmax(logits[:n].float(), dim=-1)
    targets = torch.tensor(prompt[start + 1 : start + 1 + n], device=logprobs.device)
    values = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    k = active.job.request.sampling.prompt_logprobs or 0
    tops: list[tuple[tuple[int, float], ...]] = [()] * n
    if k > 0:
        best, ids = logprobs.topk(k, dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), best.tolist(),
                                                               strict=True)]
    active.prompt_logprobs.extend(TokenLogprob(t, lp, top) for t, lp, top in
                                  zip(targets.tolist(), values, tops, strict=True))


def _batch_argmax(running: list[_Active], logits: torch.Tensor) -> list[int] | None:
    """Every row's token at once when every row is plain greedy (one op for the batch)."""
    if not all(a.sequence.sampler.plain_greedy for a in running):
        return None
    if not bool(torch.isfinite(logits).any(dim=-1).all()):
        return None  # let the rows with bad logits fail one by one
    return logits.argmax(dim=-1).tolist()


def _failed(where: str, exc: BaseException) -> GenerationError:
    """The client's view of an internal failure: where and what kind, never the details
    (they may hold paths or tensors; the log has them)."""
    return GenerationError(f"generation failed in {where} ({type(exc).__name__}); "
                           "see the server log")
