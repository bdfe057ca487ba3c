"""Attention kernels against torch SDPA: ``triton-dist bench attention -n N``.

::

    triton-dist bench attention -n 1 [--cases decode,prefill] [--samples 20] [--out DIR] [--plot PATH | --no-plot]
    triton-dist bench attention -n 4 --cases sp_decode          # distributed decode, any world (shared GPUs too)
    triton-dist bench attention -n 2 --mode cpu -- --smoke      # CPU world: a plumbing check, no timings
    python -m triton_dist.bench.attention --render bench/results/h200.jsonl [--run-id ID]   # no GPU needed

``decode`` (world size 1): :func:`~triton_dist.kernels.attention.flash_decode.flash_decode` (provider
``triton_dist:flash_decode``, KV contiguous, and ``triton_dist:flash_decode_paged``, pages of ``--page-size``
tokens in a shuffled block table) against ``torch.nn.functional.scaled_dot_product_attention`` (``torch_sdpa``:
q ``[B, Hq, 1, D]``, K/V ``[B, Hkv, T, D]`` contiguous, ``enable_gqa``) on the issue's shapes: bf16, D=128, 32 q / 8
kv heads, batch 1-64, contexts 4k-128k, every sequence at full length. ``gbps`` = K and V bytes over the median
(goal: >= 4.0 TB/s where the cache is 64 MB or more), CUDA-graph replay of ``--graph-calls`` calls, caches rotated
to cover twice the L2.

``prefill`` (world size 1): :func:`~triton_dist.kernels.attention.flash_attn.flash_attn` (``triton_dist:flash_attn``)
against SDPA on one sequence of 4k-32k tokens, 32 heads, D=128, causal and not; ``tflops`` counts ``4 T^2 H D``
(half of it causal). Each gets the same values in its own contiguous layout: ours ``[B, T, H, D]`` (heads dense,
as a QKV projection writes them), SDPA ``[B, H, T, D]``. Ours is checked against SDPA's output.

``sp_decode`` (any world): ``ops.sp_flash_decode`` (the KV sequence split evenly over the ranks; LL all-gather of
the partials) against the same local decode followed by ``torch.distributed.all_gather`` and a torch merge
(``triton_dist:flash_decode+nccl``). In a shared-GPU world its rows are marked ``shared_gpu`` (not performance).

Rows go to ``<out>/<card>.jsonl``: op ``flash_decode`` (shape ``B=..,T=..,page=..,hq=..,hkv=..,d=..``),
``flash_attn`` (``T=..,h=..,d=..,causal=..``), ``sp_flash_decode`` (``B=..,T=..,world=..``).
"""
from __future__ import annotations

import argparse
import os
import zlib
from dataclasses import dataclass

from .cores import CheckedBench, add_timing_args, timing_defaults
from .gemm import DTYPE_NAMES, _choices, _int_list, rotation
from .harness import Recorder
from .report import (Progress, add_render_args, announce_shared_gpu, card_plot_path, format_pair_tables, load_runs,
                     plot_pairs, render_recorded)

CASES = ("decode", "prefill", "sp_decode")
OURS = {"flash_decode": ("triton_dist:flash_decode", "triton_dist:flash_decode_paged"),
        "flash_attn": ("triton_dist:flash_attn",), "sp_flash_decode": ("triton_dist:sp_flash_decode",)}
BASELINE = {"flash_decode": "torch_sdpa", "flash_attn": "torch_sdpa",
            "sp_flash_decode": "triton_dist:flash_decode+nccl"}
GOAL = {"flash_decode": 1.0, "flash_attn": 1 / 0.9, "sp_flash_decode": 1.0}  # ours / baseline time at most
DEFAULT_PLOT = os.path.join("docs", "perf", "attention_{card}.png")
DECODE_SHAPES = ((1, 4096), (1, 32768), (1, 131072), (16, 8192), (64, 4096), (16, 32768), (4, 131072))
PREFILL_T = (4096, 16384, 32768)


@dataclass(frozen=True)
class DecodeCase:
    b: int
    t: int
    hq: int = 32
    hkv: int = 8
    d: int = 128

    def shape(self, page: int) -> str:
        return f"B={self.b},T={self.t},page={page},hq={self.hq},hkv={self.hkv},d={self.d}"

    def kv_bytes(self, elem: int) -> int:
        return 2 * self.b * self.t * self.hkv * self.d * elem


def attention_tolerance(ref) -> float:
    """Max abs error allowed against an fp32 reference: bf16 rounding of the probabilities and the output."""
    return 2e-2 * ref.abs().max().item() + 2e-3


def paged(k, v, page: int, seed: int):
    """``k`` / ``v`` [B, T, Hkv, D] as pages of ``page`` tokens in a shuffled order, with their block table."""
    import torch
    b, t = k.shape[:2]
    per = t // page
    perm = torch.randperm(b * per, generator=torch.Generator().manual_seed(seed)).to(torch.int32).to(k.device)
    kp = torch.empty((b * per, page) + tuple(k.shape[2:]), dtype=k.dtype, device=k.device)
    vp = torch.empty_like(kp)
    kp[perm.long()] = k.reshape(b * per, page, *k.shape[2:])
    vp[perm.long()] = v.reshape(b * per, page, *v.shape[2:])
    return kp, vp, perm.view(b, per)


class _AttentionBench(CheckedBench):
    def decode(self, c: DecodeCase, page: int) -> None:
        import torch
        import torch.nn.functional as F
        from triton_dist.kernels.attention import flash_decode as fd
        dev = self.world.device
        rot = rotation(c.kv_bytes(self.elem), self.l2, cap=8)
        seed = zlib.crc32(c.shape(page).encode())
        lens = torch.full((c.b,), c.t, dtype=torch.int32, device=dev)
        sets = []
        for i in range(rot):
            q = self.rand((c.b, c.hq, c.d), seed + 3 * i)
            k = self.rand((c.b, c.t, c.hkv, c.d), seed + 3 * i + 1)
            v = self.rand((c.b, c.t, c.hkv, c.d), seed + 3 * i + 2)
            entry = dict(q=q, k=k, v=v, ks=k.transpose(1, 2).contiguous(), vs=v.transpose(1, 2).contiguous())
            if page:
                entry["kp"], entry["vp"], entry["table"] = paged(k, v, page, seed + i)
            sets.append(entry)
        s0 = sets[0]
        ref, _ = fd.flash_decode_reference(s0["q"], s0["k"], s0["v"], lens)
        outs = [torch.empty_like(s["q"]) for s in sets]
        providers = [("triton_dist:flash_decode", lambda i: fd.flash_decode(
            sets[i]["q"], sets[i]["k"], sets[i]["v"], lens, out=outs[i]))]
        if page:
            providers.append(("triton_dist:flash_decode_paged", lambda i: fd.flash_decode(
                sets[i]["q"], sets[i]["kp"], sets[i]["vp"], lens, block_table=sets[i]["table"], out=outs[i])))
        providers.append(("torch_sdpa", lambda i: F.scaled_dot_product_attention(
            sets[i]["q"].unsqueeze(2), sets[i]["ks"], sets[i]["vs"], enable_gqa=True).squeeze(2)))
        self._time("flash_decode", c.shape(page), providers, ref, attention_tolerance(ref), rot,
                   nbytes=c.kv_bytes(self.elem), flops=4 * c.b * c.t * c.hq * c.d,
                   graph=self.args.graph_calls if self.gpu else 0)
        for s in sets:
            s.clear()

    def prefill(self, t: int, causal: bool, h: int = 32, d: int = 128) -> None:
        import torch
        import torch.nn.functional as F
        from triton_dist.kernels.attention import flash_attn as fa
        seed = zlib.crc32(f"prefill:{t}:{causal}".encode())
        # each in its own contiguous layout, the same values: ours [B, T, H, D] (a QKV projection's rows: heads dense,
        # K/V by TMA), SDPA [B, H, T, D] (its fastest input: a transposed view costs it 1-2 %, docs/perf/NOTES.md)
        qb, kb, vb = (self.rand((1, t, h, d), seed + i) for i in range(3))
        q, k, v = (x.transpose(1, 2).contiguous() for x in (qb, kb, vb))
        if self.gpu:
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).float()
        else:
            ref = fa.flash_attn_reference(qb, kb, vb, causal=causal)[0].float()
        out = torch.empty((1, t, h, d), dtype=self.dtype, device=self.world.device)
        providers = [("triton_dist:flash_attn", lambda i: fa.flash_attn(qb, kb, vb, causal=causal, out=out)),
                     ("torch_sdpa", lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                      .transpose(1, 2))]
        flops = 4 * t * t * h * d // (2 if causal else 1)
        self._time("flash_attn", f"T={t},h={h},d={d},causal={int(causal)}", providers, ref, attention_tolerance(ref),
                   1, nbytes=4 * t * h * d * self.elem, flops=flops, graph=0)

    def sp_decode(self, b: int, t: int, hq: int = 32, hkv: int = 8, d: int = 128) -> None:
        import torch
        import torch.distributed as dist
        from triton_dist import ops
        from triton_dist.kernels.attention import flash_decode as fd
        from triton_dist.kernels.attention._common import merge_partials_reference
        w = self.world
        t_loc = t // w.world_size
        seed = zlib.crc32(f"sp:{b}:{t}".encode())
        q = self.rand((b, hq, d), seed)  # the same query on every rank
        k = self.rand((b, t_loc, hkv, d), seed + 1 + w.rank)
        v = self.rand((b, t_loc, hkv, d), seed + 101 + w.rank)
        lens = torch.full((b,), t_loc, dtype=torch.int32, device=w.device)
        ref = ops.sp_flash_decode_reference(q, k, v, lens)[0]

        def nccl(i):
            part, lse = fd.flash_decode(q, k, v, lens, return_lse=True, out_dtype=torch.float32)
            parts = [torch.empty_like(part) for _ in range(w.world_size)]
            lses = [torch.empty_like(lse) for _ in range(w.world_size)]
            dist.all_gather(parts, part, group=w.group)
            dist.all_gather(lses, lse, group=w.group)
            return merge_partials_reference(torch.stack(parts), torch.stack(lses))[0].to(q.dtype)

        providers = [("triton_dist:sp_flash_decode", lambda i: ops.sp_flash_decode(q, k, v, lens)),
                     ("triton_dist:flash_decode+nccl", nccl)]
        self._time("sp_flash_decode", f"B={b},T={t},world={w.world_size}", providers, ref, attention_tolerance(ref),
                   1, nbytes=2 * b * t_loc * hkv * d * self.elem, flops=4 * b * t_loc * hq * d,
                   graph=self.args.graph_calls if self.gpu else 0)


# ---------------------------------------------------------------------------------------------- report
def attention_pairs(rows: list[dict]) -> dict:
    """``{op: {label: (ours_us, baseline_us, ours_row)}}``: each of our providers against the case's baseline (label:
    the shape, plus ``[paged]`` for the paged decode); a later row of the same (op, shape, provider) replaces an
    earlier one."""
    cells: dict = {}
    for r in rows:
        op = r.get("op")
        if op not in OURS:
            continue
        c = cells.setdefault((op, r["shape"]), {})
        if r["provider"] in OURS[op]:
            c.setdefault("ours", {})[r["provider"]] = r
        elif r["provider"] == BASELINE[op]:
            c["base"] = r["median_us"]
    out: dict = {}
    for (op, shape), c in cells.items():
        for prov, r in (c.get("ours") or {}).items():
            if c.get("base"):
                label = shape + (" [paged]" if prov.endswith("_paged") else "")
                out.setdefault(op, {})[label] = (r["median_us"], c["base"], r)
    return out


def load_attention_rows(path: str, run_id: str | None = None) -> list[dict]:
    """The attention rows of a ``<card>.jsonl``, of the runs ``run_id`` (one id or a comma list; default all)."""
    rows = load_runs(path, lambda r: r.get("op") in OURS, run_id)
    if not attention_pairs(rows):
        raise ValueError(f"{path} holds no attention rows" + (f" of run(s) {run_id}" if run_id else ""))
    return rows


def format_attention_tables(rows: list[dict], notes: list[str] | None = None) -> str:
    """Per op: each shape's time, SDPA's, the ratio, the rate (TB/s of K+V for decode, TFLOP/s for prefill) and
    whether it meets the goal."""
    def rate(op, r):
        return f"  {r['gbps'] / 1000:5.2f} TB/s" if op != "flash_attn" else f"  {r['tflops']:6.1f} TFLOP/s"
    return format_pair_tables(attention_pairs(rows), GOAL, BASELINE.get, rate, 52, notes)


def default_plot_path(card: str) -> str:
    """``docs/perf/attention_<card>.png``."""
    return card_plot_path(DEFAULT_PLOT, card)


def plot_attention_rows(rows: list[dict], path: str, title: str | None = None) -> str | None:
    """One panel per op: ours / baseline time per shape, the goal as a line. PNG at ``path``, or None (a printed
    note) without matplotlib or rows."""
    return plot_pairs(attention_pairs(rows), rows, path, GOAL, BASELINE.get, "attention", title)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="triton-dist bench attention", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory of <card>.jsonl [default: bench/results; --smoke: none]")
    ap.add_argument("--cases", type=_choices(CASES), default=None,
                    help="comma-separated subset of " + ",".join(CASES) + " [default: decode,prefill at world size "
                         "1, sp_decode otherwise]")
    ap.add_argument("--page-size", type=int, default=16, help="tokens per page of the paged decode rows (0: none)")
    ap.add_argument("--prefill-t", type=_int_list, default=list(PREFILL_T), help="prefill tokens")
    add_timing_args(ap)
    add_render_args(ap, DEFAULT_PLOT.format(card="<card>"))
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.render:
        render_recorded(args, load_attention_rows, format_attention_tables, plot_attention_rows, default_plot_path)
        return
    timing_defaults(ap, args)
    import torch

    import triton_dist
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    world = triton_dist.init()
    if world.interpreted and not args.smoke:
        raise SystemExit("triton-dist bench attention needs a GPU (the CPU world has no meaningful timings; --smoke "
                         "runs tiny shapes there as a plumbing check)")
    cases = args.cases or (["decode", "prefill"] if world.world_size == 1 else ["sp_decode"])
    if world.world_size != 1 and set(cases) - {"sp_decode"}:
        raise SystemExit("decode and prefill time single-GPU kernels: run them with -n 1")
    announce_shared_gpu(world)
    rec = Recorder(args.out or os.path.join("bench", "results"), world.world_size, world.rank,
                   shared_gpu=world.shared_gpu)
    if args.smoke:
        decode = [DecodeCase(2, 64, hq=4, hkv=2, d=64)]
        prefill, sp = [(48, 2, 64)], [(2, 64 * world.world_size, 4, 2, 64)]
        page = 8 if args.page_size else 0
    else:
        decode = [DecodeCase(b, t) for b, t in DECODE_SHAPES]
        prefill, sp = [(t, 32, 128) for t in args.prefill_t], [(1, 32768), (16, 8192), (64, 4096)]
        page = args.page_size
    progress = Progress(2 * len(decode) * ("decode" in cases) + 4 * len(prefill) * ("prefill" in cases)
                        + 2 * len(sp) * ("sp_decode" in cases), enabled=world.rank == 0)
    bench = _AttentionBench(world, rec, args, dtype, progress)
    if "decode" in cases:
        for c in decode:
            bench.decode(c, page)
    if "prefill" in cases:
        for t, h, d in prefill:
            for causal in (True, False):
                bench.prefill(t, causal, h, d)
    if "sp_decode" in cases:
        for case in sp:
            bench.sp_decode(*case)
    progress.finish()
    bench.finish(args, lambda rows: format_attention_tables(rows) if attention_pairs(rows) else "",
                 plot_attention_rows, default_plot_path)


if __name__ == "__main__":
    main()
