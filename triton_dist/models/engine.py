"""The generation engine: KV caches, prefill, CUDA-graph decode steps and sampling for a model of
:func:`~triton_dist.models.qwen3.build_model` (gpt-fast's small generate loop, kept apart from the model file).

::

    model = build_model(cfg, mode="ag_rs", device=world.device)
    loader.init_random(model, seed=0)
    engine = Engine(model, max_batch=8, max_len=1024)
    res = engine.generate(prompt_ids, 64)              # prompt_ids [B, P]: res.tokens [B, 64]
    res = engine.generate(prompt_ids, 64, sampling="top_p", top_p=0.9, temperature=0.7, seed=1)

Prefill runs eagerly from position 0 (every prompt of a batch has the same length). Decode steps on GPUs replay one
``torch.cuda.CUDAGraph`` per **batch bucket** (powers of two up to ``max_batch``, and ``max_batch``; in the ``ag_rs``
mode rounded up to a multiple of the world size, whose token shards must be whole) and sampling kind: a batch is
padded with dummy sequences to its bucket, and the graph reads its token ids, positions ``[bucket, 1]`` and KV lengths
``[bucket]`` from static device buffers that are overwritten before each replay, so one capture serves every step.
Each capture follows PyTorch's recipe: the step runs eagerly three times on a side stream first (our ops autotune and
make their contexts at their first call, which must not be captured), then once under capture. Sampling (greedy
argmax, or top-p with a temperature: an exponential race over the nucleus, which needs no host sync) is part of the
graph; its random numbers come from a ``torch.Generator`` on the device that each top-p graph owns (registered with
it: a registered generator may not be used outside its graph, so the eager draws, the first token's among them, use
the engine's own), all seeded by :meth:`Engine.generate`, identically on every rank: the logits are the same on every
rank after the LM head's vocabulary gather, so every rank draws the same tokens.

A graph holds the addresses of the ops' cached contexts (symmetric buffers). A later call that outgrows a context
(a longer prefill, say) replaces it; the engine notices before the next replay and captures again. If a capture
fails on any rank (an op that syncs with the host, a collective that cannot be captured), every rank runs that
bucket's steps eagerly and :attr:`Engine.notes` says why. In the CPU world (or with ``cuda_graphs=False``) every
step is eager.

Padding rows are dummy sequences: their tokens are 0, their positions and KV lengths the real rows', their KV cache
rows the engine's spare ones; no op mixes tokens across rows, so they cannot change the real rows' results.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import triton_dist
from triton_dist.layers import KVCache, Parallel, Step

SAMPLING = ("greedy", "top_p")
WARMUP_STEPS = 3  # eager runs of a step on a side stream before its capture (PyTorch's docs: at least two)


@dataclass
class GenerateResult:
    """What :meth:`Engine.generate` returns: ``tokens`` [B, n] int64 on the CPU (``n`` = ``gen_len``, fewer when it
    stopped at an end-of-sequence token; then each sequence is padded with its first such token), ``prefill_ms``
    (the prompt's forward plus the first token's sampling), ``step_ms`` (each decode step's time on this rank: CUDA
    events on GPUs, the host clock in the CPU world; ``n - 1`` steps) and ``graphed`` (whether the decode steps were
    CUDA-graph replays)."""

    tokens: torch.Tensor
    prefill_ms: float
    step_ms: list[float] = field(default_factory=list)
    graphed: bool = False

    @property
    def median_step_ms(self) -> float:
        """The median decode step (NaN without steps)."""
        return quantile(self.step_ms, 0.5)

    @property
    def p90_step_ms(self) -> float:
        return quantile(self.step_ms, 0.9)


def quantile(xs, q: float) -> float:
    """Linear-interpolated quantile ``q`` of ``xs`` (NaN when empty)."""
    xs = sorted(xs)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def sample_tokens(logits: torch.Tensor, sampling: str = "greedy", *, top_p=1.0, temperature=1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] (int64) from ``logits`` [B, V], with torch ops only (no host sync: CUDA-graph capturable).

    ``greedy``: the argmax. ``top_p``: the probabilities ``softmax(logits / temperature)`` cut to the smallest set of
    most likely tokens whose mass reaches ``top_p`` (the most likely token always stays), then one token drawn from
    that set in proportion to its probability, by an exponential race (``argmax p_i / e_i`` with ``e_i ~ Exp(1)``
    from ``generator``). ``top_p`` and ``temperature`` may be floats or 0-dim tensors on the logits' device (a
    captured graph reads the tensors at each replay)."""
    if sampling == "greedy":
        return torch.argmax(logits, dim=-1)
    if sampling != "top_p":
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    p, order = torch.sort(probs, dim=-1, descending=True)
    p = p.masked_fill(torch.cumsum(p, dim=-1) - p > top_p, 0.0)  # mass before a token already reached top_p
    race = torch.empty_like(p).exponential_(generator=generator)
    pick = torch.argmax(p / race, dim=-1, keepdim=True)
    return torch.gather(order, -1, pick).squeeze(-1)


def batch_buckets(max_batch: int, multiple: int = 1) -> list[int]:
    """The decode batch sizes the engine captures: powers of two below ``max_batch``, and ``max_batch``, each
    rounded up to a multiple of ``multiple`` (the ``ag_rs`` mode's world size), without repeats."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sorted({-(-s // multiple) * multiple for s in sizes})


def _contexts() -> dict:
    """The ops' cached contexts now (a graph captured with them is valid while each is still the cached one)."""
    from triton_dist import ops
    return ops.cached_contexts()


@dataclass
class _Graph:
    graph: object
    logits: torch.Tensor
    tokens: torch.Tensor
    contexts: dict
    gen: torch.Generator | None = None  # the graph's own generator (top-p), registered with it

    def valid(self) -> bool:
        now = _contexts()
        return all(now.get(k) is ctx for k, ctx in self.contexts.items())


class _Clock:
    """Marks on this rank's timeline: CUDA events on GPUs (no sync until :meth:`ms`), the host clock otherwise."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            if self.marks:
                self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


class Engine:
    """Generation with ``model`` (a :class:`~triton_dist.models.qwen3.CausalLM`, split over the current world in its
    mode) for up to ``max_batch`` sequences of up to ``max_len`` tokens (prompt plus generated tokens but the last);
    see the module docstring.

    The engine owns the KV caches (``page_size``: paged, FlashInfer / vLLM's layout) for its largest batch bucket.
    ``cuda_graphs``: replay captured decode steps on GPUs (False: eager steps everywhere). Call it identically on every
    rank (same shapes, same order): its steps are collective."""

    def __init__(self, model, *, max_batch: int, max_len: int, page_size: int | None = None,
                 cuda_graphs: bool = True):
        for name, v in (("max_batch", max_batch), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Engine: {name} must be a positive integer, got {v!r}")
        if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1):
            raise ValueError(f"Engine: page_size must be a positive integer or None, got {page_size!r}")
        self.model = model
        self.config = model.config
        par = getattr(model, "par", None) or Parallel()
        self.mode, self.world_size = par.mode, par.world_size
        self._group = par.group if par.world_size > 1 else None
        self.device = model.model.embed_tokens.weight.device
        self.max_batch, self.max_len, self.page_size = max_batch, max_len, page_size
        self._multiple = par.world_size if par.sequence_sharded else 1
        self.buckets = batch_buckets(max_batch, self._multiple)
        rows = self.buckets[-1]
        self.caches = model.new_caches(rows, max_len, page_size=page_size)
        interpreted = triton_dist.is_initialized() and triton_dist.current_world().interpreted
        self.cuda = self.device.type == "cuda" and not interpreted
        self.cuda_graphs = bool(cuda_graphs) and self.cuda
        self.notes: list[str] = []
        # static inputs of a decode step (a captured graph reads them at every replay)
        dev = self.device
        self._ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self._pos = torch.zeros((rows, 1), dtype=torch.int64, device=dev)
        self._kv_lens = torch.zeros(rows, dtype=torch.int32, device=dev)
        self._top_p = torch.ones((), dtype=torch.float32, device=dev)
        self._temperature = torch.ones((), dtype=torch.float32, device=dev)
        self._gen = torch.Generator(device=dev)  # the eager draws; each top-p graph has its own (a generator
        # registered with a graph may not be used outside it)
        self._graphs: dict = {}  # (bucket, sampling) -> _Graph
        self._eager: set = set()  # (bucket, sampling) whose capture failed
        self._views: dict = {}
        self._batch = self._bucket = self._len = 0  # the batch since the last prefill, its bucket, tokens cached

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompts ``ids`` [B, P] from position 0 (the caches' old contents are overwritten); returns the fp32
        logits [B, vocab] of each prompt's last token. :meth:`decode_step` continues from here."""
        logits = self._prefill(ids)
        return logits[: self._batch].clone()

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [B] (one per sequence of the last prefill) and return the fp32 logits [B, vocab] of the
        next position (a greedy graph replay on GPUs)."""
        if not self._batch:
            raise ValueError("Engine.decode_step: no sequences yet (call prefill first)")
        if tokens.dim() != 1 or tokens.shape[0] != self._batch:
            raise ValueError(f"Engine.decode_step: expected tokens [{self._batch}] (one per sequence of the last "
                             f"prefill), got {tuple(tokens.shape)}")
        if self._len >= self.max_len:
            raise ValueError(f"Engine.decode_step: the KV caches are full ({self.max_len} tokens = max_len)")
        self._ids[: self._batch].copy_(tokens)
        self._ids[self._batch: self._bucket].zero_()
        self._set_position(self._bucket)  # a capture's warm-up steps write where this step writes
        logits, _ = self._step(self._runner("greedy"))
        return logits[: self._batch].clone()

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, gen_len: int, *, sampling: str = "greedy", top_p: float = 0.9,
                 temperature: float = 1.0, seed: int = 0, stop_at_eos: bool = False) -> GenerateResult:
        """``gen_len`` new tokens after each prompt of ``prompt_ids`` [B, P]: a prefill, then ``gen_len - 1`` decode
        steps (see the module docstring). ``sampling``: ``greedy`` or ``top_p`` (nucleus ``top_p`` in (0, 1] of
        ``softmax(logits / temperature)``, drawn from the engine's generator seeded with ``seed``: the same seed gives
        the same tokens). ``stop_at_eos``: stop once every sequence has produced one of the config's
        ``eos_token_id`` (a host sync per step; off by default, so every run decodes ``gen_len`` tokens)."""
        if sampling not in SAMPLING:
            raise ValueError(f"Engine.generate: sampling must be one of {SAMPLING}, got {sampling!r}")
        if isinstance(gen_len, bool) or not isinstance(gen_len, int) or gen_len < 1:
            raise ValueError(f"Engine.generate: gen_len must be a positive integer, got {gen_len!r}")
        if sampling == "top_p":
            if not 0.0 < top_p <= 1.0:
                raise ValueError(f"Engine.generate: top_p must be in (0, 1], got {top_p!r}")
            if not temperature > 0.0 or not math.isfinite(temperature):
                raise ValueError(f"Engine.generate: temperature must be a positive number, got {temperature!r}")
        eos = self._eos_ids() if stop_at_eos else None
        P = self._check_prompt("Engine.generate", prompt_ids)
        if P + gen_len - 1 > self.max_len:
            raise ValueError(f"Engine.generate: a prompt of {P} tokens and {gen_len} new ones need {P + gen_len - 1} "
                             f"cached tokens, more than max_len {self.max_len}")
        clock = _Clock(self.cuda)
        clock.mark()
        logits = self._prefill(prompt_ids)
        clock.mark()
        B, nb = self._batch, self._bucket
        run = None
        if gen_len > 1:  # capture (or re-capture) before seeding: the warm-up steps draw random numbers too
            self._set_position(nb)
            run = self._runner(sampling)
        self._top_p.fill_(top_p)
        self._temperature.fill_(temperature)
        self._gen.manual_seed(seed)
        graph = self._graphs.get((nb, sampling))
        if graph is not None and graph.gen is not None:
            graph.gen.manual_seed(seed)
        clock.mark()
        first = sample_tokens(logits[:B], sampling, top_p=self._top_p, temperature=self._temperature,
                              generator=self._gen)
        clock.mark()
        out = torch.zeros((nb, gen_len), dtype=torch.int64, device=self.device)
        out[:B, 0] = first
        self._ids[:B].copy_(first)
        self._ids[B:nb].zero_()
        done = None if eos is None else torch.isin(first, eos)
        n = gen_len
        for i in range(1, gen_len):
            if done is not None and bool(done.all()):
                n = i
                break
            _, nxt = self._step(run)
            out[:, i].copy_(nxt)
            self._ids[:nb].copy_(nxt)
            clock.mark()
            if done is not None:
                done |= torch.isin(nxt[:B], eos)
        ms = clock.ms()
        tokens = out[:B, :n].cpu()
        if eos is not None:
            tokens = _pad_after_eos(tokens, eos.cpu())
        key = (nb, sampling)
        return GenerateResult(tokens=tokens, prefill_ms=ms[0] + ms[2], step_ms=ms[3:3 + n - 1],
                              graphed=gen_len > 1 and key in self._graphs)

    # ------------------------------------------------------------------ internals
    def _eos_ids(self) -> torch.Tensor:
        eos = self.config.eos_token_id
        if eos is None:
            raise ValueError("Engine.generate: stop_at_eos needs the config's eos_token_id, which is None")
        eos = (eos,) if isinstance(eos, int) else tuple(eos)
        return torch.tensor(eos, dtype=torch.int64, device=self.device)

    def _check_prompt(self, what: str, ids) -> int:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.is_complex():
            raise ValueError(f"{what}: expected integer token ids [batch, prompt_len], got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}"
                             f"{'' if not isinstance(ids, torch.Tensor) else ' ' + str(ids.dtype)}")
        B, P = ids.shape
        if B < 1 or P < 1:
            raise ValueError(f"{what}: empty prompts {tuple(ids.shape)}")
        if B > self.max_batch:
            raise ValueError(f"{what}: a batch of {B} sequences is larger than max_batch {self.max_batch} (the "
                             "engine's KV caches hold that many)")
        if P > self.max_len:
            raise ValueError(f"{what}: a prompt of {P} tokens is longer than max_len {self.max_len}")
        if ids.device.type == "cpu" and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"{what}: token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return P

    def _bucket_of(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _views_of(self, n: int) -> list[KVCache]:
        if n not in self._views:
            self._views[n] = [c.rows(n) for c in self.caches]
        return self._views[n]

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The padded prefill: logits [rows, vocab] (rows >= B: padding so that ag_rs's token shards are whole)."""
        B, P = ids.shape[0], self._check_prompt("Engine.prefill", ids)
        step_multiple = self._multiple // math.gcd(P, self._multiple)
        rows = -(-B // step_multiple) * step_multiple
        padded = torch.zeros((rows, P), dtype=torch.int64, device=self.device)
        padded[:B] = ids.to(self.device)
        pos = torch.arange(P, device=self.device)[None].expand(rows, P)
        lens = torch.full((rows,), P, dtype=torch.int32, device=self.device)
        logits = self.model(padded, Step(rows, P, pos, lens), self._views_of(rows))
        self._batch, self._bucket, self._len = B, self._bucket_of(B), P
        return logits

    def _set_position(self, nb: int) -> None:
        """The static positions / KV lengths of the next step (every sequence has ``self._len`` cached tokens)."""
        self._pos[:nb].fill_(self._len)
        self._kv_lens[:nb].fill_(self._len + 1)

    def _forward(self, nb: int, sampling: str, gen: torch.Generator | None = None):
        """One decode step of the bucket from the static buffers: ``(logits [nb, V], next tokens [nb])``, drawing
        from ``gen`` (default the engine's eager generator)."""
        step = Step(nb, 1, self._pos[:nb], self._kv_lens[:nb])
        logits = self.model(self._ids[:nb, None], step, self._views_of(nb))
        return logits, sample_tokens(logits, sampling, top_p=self._top_p, temperature=self._temperature,
                                     generator=gen or self._gen)

    def _step(self, run):
        self._set_position(self._bucket)
        out = run()
        self._len += 1
        return out

    def _runner(self, sampling: str):
        """What runs one decode step of the current bucket: a graph replay (captured now if needed) or eager."""
        nb = self._bucket
        key = (nb, sampling)
        if self.cuda_graphs and key not in self._eager:
            g = self._graphs.get(key)
            if g is None or not g.valid():  # drop the graphs whose ops' contexts were replaced since their capture
                self._graphs = {k: v for k, v in self._graphs.items() if v.valid()}
                g = self._capture(nb, sampling)
            if g is not None:
                def replay(g=g):
                    g.graph.replay()
                    return g.logits, g.tokens
                return replay
        return lambda: self._forward(nb, sampling)

    def _capture(self, nb: int, sampling: str) -> _Graph | None:
        """Warm up and capture the bucket's step (the static buffers must hold a valid position). None, on every
        rank, when it failed on any rank (noted)."""
        err, graph, logits, tokens, gen = None, None, None, None, None
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._forward(nb, sampling)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            if sampling != "greedy":
                gen = torch.Generator(device=self.device)
                graph.register_generator_state(gen)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits, tokens = self._forward(nb, sampling, gen)
            torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001  (any failure: eager steps for this bucket, on every rank)
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            graph = logits = tokens = None
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001
                pass
        failed = self._agree(err)
        if failed:
            self._eager.add((nb, sampling))
            self.notes.append(f"decode batch {nb} ({sampling}): CUDA-graph capture failed ({'; '.join(failed)}); "
                              "its steps run eagerly")
            return None
        g = self._graphs[(nb, sampling)] = _Graph(graph, logits, tokens, _contexts(), gen)
        return g

    def _agree(self, err: str | None) -> list[str]:
        """Every rank learns which ranks failed: ``["rank r: message", ...]`` (empty: none)."""
        if self._group is None or not dist.is_initialized():
            return [f"rank 0: {err}"] if err else []
        flag = torch.tensor([0 if err is None else 1], dtype=torch.int32)  # CPU: gloo
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if not flag.item():
            return []
        errs = [None] * self.world_size
        dist.all_gather_object(errs, err, group=self._group)
        return [f"rank {r}: {e}" for r, e in enumerate(errs) if e is not None]


def _pad_after_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Each row's tokens after its first end-of-sequence token replaced by that token."""
    tokens = tokens.clone()
    hit = torch.isin(tokens, eos)
    for b in range(tokens.shape[0]):
        where = hit[b].nonzero()
        if where.numel():
            j = int(where[0])
            tokens[b, j + 1:] = tokens[b, j]
    return tokens
