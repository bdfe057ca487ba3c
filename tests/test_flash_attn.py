"""The prefill flash-attention forward (``kernels/attention/flash_attn.py``) against its fp32 torch reference. CPU:
fp32 and fp16 in this process, bf16 inside a world (the interpreter's bf16 is mended by ``triton_dist.init()``); packed
sequences with odd and empty lengths, causal and not, Tq != Tk (rows with no key), causal offsets, GQA ratios 1/4/8,
soft-capping, the lse, the batched layout, TMA and pointer K/V, several tile shapes, garbage past the sequences, the
reusable row-block body over chunks of keys, the tuner's path and every bad input. GPU-only (bf16, 4k-16k tokens, D =
128, 32 / 8 heads) at the end."""
import pytest
import torch
import triton
import triton.language as tl

from triton_dist.kernels.attention import flash_attn as fa
from triton_dist.kernels.attention._common import LOG2E, attention_rows_reference, finish_rows

from _util import poison, rand, this_world
from conftest import BACKEND

# the interpreter converts scalars loaded from memory (cu_seqlens, chunk bounds) to loop bounds through numpy's
# deprecated array-to-int path: one warning per loop, not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
DEVICE = "cpu" if BACKEND == "cpu" else "cuda"  # the GPU suite runs the same tests on its GPU
D = 64
SQUARE = fa.CPU_CONFIG  # 32 x 32
TALL = fa.FlashAttnConfig(32, 16, num_warps=4, num_stages=1)  # two masked tiles on each causal diagonal
WIDE = fa.FlashAttnConfig(16, 32, num_warps=4, num_stages=1)  # key tiles wider than the row blocks
PTR = fa.FlashAttnConfig(32, 32, num_warps=4, num_stages=1, use_tma=False)  # pointer K/V
CONFIGS = {"square": SQUARE, "tall": TALL, "wide": WIDE, "ptr": PTR}


def _cu(lens, device=DEVICE):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _packed(lens_q, lens_k, hq, hkv, dtype, seed, device=DEVICE, pad=0, d=D):
    """Fresh q, k, v of packed sequences (``pad`` extra tokens past the last sequence) and their cu_seqlens."""
    q = rand((sum(lens_q) + pad, hq, d), dtype, seed, device)
    k = rand((sum(lens_k) + pad, hkv, d), dtype, seed + 1, device)
    v = rand((sum(lens_k) + pad, hkv, d), dtype, seed + 2, device) * 2 - 1
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device)


def _close(got, want, v, dtype, what):
    """fp32: tight. fp16 / bf16: one ulp of the largest output (its rounding) plus one of the largest value of v (the
    probabilities are rounded to the input dtype before the P @ V product: each term is off by at most half an ulp
    relative, so the weighted mean by half an ulp of max |v|), each with a factor 2 of slack."""
    assert torch.isfinite(got).all(), f"{what}: NaN/inf in the output (unwritten, poisoned rows?)"
    if dtype == torch.float32:
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4, msg=what)
        return
    err = (got.float() - want).abs().max().item()
    bound = torch.finfo(dtype).eps * (want.abs().max().item() + v.float().abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} above {bound:.3g}"


def _close_lse(got, want, what):
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: lse -inf on different rows"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4, msg=what)


def _varlen_case(lens_q, lens_k, hq, hkv, dtype, seed, cfg, device=DEVICE, **kw):
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, hq, hkv, dtype, seed, device)
    out = poison(torch.empty_like(q))
    got, lse = fa.flash_attn_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
                                    return_lse=True, out=out, config=cfg, **kw)
    assert got is out and lse.shape == q.shape[:2] and lse.dtype == torch.float32
    want, want_lse = fa.flash_attn_reference(q, k, v, cu_q, cu_k, **kw)
    what = f"varlen {lens_q}/{lens_k} {hq}/{hkv} heads {dtype} {kw} {cfg}"
    _close(got, want, v, dtype, what)
    _close_lse(lse, want_lse, what)
    return got


LENS = [1, 37, 0, 130]  # odd lengths and an empty sequence


@pytest.mark.parametrize("heads", [(2, 2), (4, 1), (8, 1)], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_matches_reference(dtype, causal, heads):
    cfg = (SQUARE, TALL, WIDE)[heads[0] // 4]
    _varlen_case(LENS, LENS, *heads, dtype, seed=heads[0] + 10 * causal, cfg=cfg, causal=causal)


@pytest.mark.parametrize("cfg", ["square", "tall", "wide", "ptr"])
def test_queries_and_keys_of_different_lengths(cfg):
    """Bottom-right causal with Tq > Tk (the first rows see no key: out 0, lse -inf), Tq < Tk (chunked prefill), a
    sequence without keys, and the same shapes without the mask."""
    lens_q, lens_k = [40, 5, 64, 3], [17, 100, 64, 0]
    for causal in (True, False):
        _varlen_case(lens_q, lens_k, 4, 2, torch.float16, seed=7, cfg=CONFIGS[cfg], causal=causal)


def test_causal_offsets_override_the_alignment():
    """Offsets below -Tq (no row sees a key), negative, zero, inside and past Tk (every row sees every key)."""
    lens_q, lens_k = [33, 20, 50, 9, 12], [70, 20, 40, 9, 30]
    offs = torch.tensor([-40, -7, 0, 25, 300], dtype=torch.int32, device=DEVICE)
    for cfg in (SQUARE, PTR):
        _varlen_case(lens_q, lens_k, 2, 1, torch.float32, seed=3, cfg=cfg, causal=True, causal_offsets=offs)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap_and_scale(causal):
    _varlen_case([45, 70], [45, 90], 4, 4, torch.float16, seed=11, cfg=TALL, causal=causal, softcap=2.0, scale=0.3)


def test_garbage_past_the_sequences_is_neither_read_nor_written():
    """NaN in the tokens past cu_seqlens[-1] (read by TMA into the last partial tiles: masked and zeroed), and the
    output rows there stay untouched."""
    for cfg in (SQUARE, PTR):
        q, k, v, cu_q, cu_k = _packed([20, 45], [20, 45], 2, 1, torch.float32, seed=5, pad=40)
        for t in (q, k, v):
            t[-40:] = float("nan")
        out = poison(torch.empty_like(q))
        fa.flash_attn_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=45, max_seqlen_k=45, causal=True, out=out,
                             config=cfg)
        want, _ = fa.flash_attn_reference(q[:65], k[:65], v[:65], cu_q, cu_k, causal=True)
        _close(out[:65], want, v[:65], torch.float32, f"pad {cfg}")
        assert torch.isnan(out[65:]).all()


def test_batched_layout_matches_varlen():
    """flash_attn on [B, T, H, D] (TMA: batches dense) equals the varlen path on the same tokens; k / v sliced from
    a longer cache (batches not dense: pointer K/V through batch strides) equal it too."""
    b, tq, tk, hq, hkv = 3, 37, 50, 4, 2
    q = rand((b, tq, hq, D), torch.float16, 1, DEVICE)
    cache_k = rand((b, 64, hkv, D), torch.float16, 2, DEVICE)
    cache_v = rand((b, 64, hkv, D), torch.float16, 3, DEVICE)
    k, v = cache_k[:, :tk], cache_v[:, :tk]
    for causal in (False, True):
        got, lse = fa.flash_attn(q, k, v, causal=causal, return_lse=True, config=SQUARE)
        dense, dense_lse = fa.flash_attn(q, k.contiguous(), v.contiguous(), causal=causal, return_lse=True,
                                         config=SQUARE)
        flat, flat_lse = fa.flash_attn_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), _cu([tq] * b),
                                              _cu([tk] * b), max_seqlen_q=tq, max_seqlen_k=tk, causal=causal,
                                              return_lse=True, config=SQUARE)
        assert got.shape == q.shape and lse.shape == (b, tq, hq)
        for x, y in ((dense, flat.view_as(q)), (dense_lse, flat_lse.view(b, tq, hq)), (got, dense), (lse, dense_lse)):
            if DEVICE == "cpu":
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3)
        want, _ = fa.flash_attn_reference(q, k, v, causal=causal)
        _close(got, want, v, torch.float16, f"batched causal={causal}")


def test_defaults_and_empty_inputs():
    """config=None (the default config: CPU_CONFIG here); no tokens at all; keys nowhere (out 0, lse -inf)."""
    _varlen_case([30, 12], [30, 12], 2, 2, torch.float32, seed=9, cfg=None, causal=True)
    q, k, v, cu_q, cu_k = _packed([0, 0], [3, 4], 2, 2, torch.float32, seed=1)
    assert fa.flash_attn_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=0, max_seqlen_k=4).shape == (0, 2, D)
    q, k, v, cu_q, cu_k = _packed([5, 3], [0, 0], 2, 2, torch.float32, seed=1)
    out, lse = fa.flash_attn_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=5, max_seqlen_k=0, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_configs_are_sane():
    for d in (64, 128, 256):
        for dtype in (torch.bfloat16, torch.float32):
            cands = fa.candidate_configs(d, dtype, True)
            assert cands and len(set(cands)) == len(cands)
            for c in cands + [fa.default_config(d, dtype)]:
                assert fa.smem_bytes(c, d, dtype) <= fa.SMEM_BUDGET, (d, c)
    if DEVICE == "cpu":  # the interpreter's config (the GPU ones: scripts/compile_checks/flash_attn.py)
        assert fa.default_config(128, torch.bfloat16) == fa.CPU_CONFIG


# ----------------------------------------------------------------------------- the row-block body, key chunk by chunk
@triton.jit
def _chunked_kernel(q, k, v, o, lse, bounds_ptr, n_chunks, tq, causal_off, qk_scale2, HQ, HKV,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr):
    """One sequence; program ``block * HQ + h``; the keys folded in by :func:`attend_rows` one chunk
    ``bounds[c] .. bounds[c + 1]`` at a time, last chunk first (any order works), as a kernel that waits for each
    chunk would."""
    h = tl.program_id(0) % HQ
    row0 = (tl.program_id(0) // HQ) * BLOCK_M
    qb = fa.load_rows(q + h * HEAD_DIM, 0, row0, tq, HQ * HEAD_DIM, BLOCK_M, HEAD_DIM)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        acc, m_i, l_i = fa.attend_rows(acc, m_i, l_i, qb, k, v, 0, h // (HQ // HKV), tl.load(bounds_ptr + c),
                                       tl.load(bounds_ptr + c + 1), row0, causal_off, HKV * HEAD_DIM, HEAD_DIM,
                                       HKV * HEAD_DIM, HEAD_DIM, qk_scale2, 0.0, BLOCK_M, BLOCK_N, HEAD_DIM, CAUSAL,
                                       False, False, "ieee")
    out, row_lse = finish_rows(acc, m_i, l_i)
    rows = row0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    keep = rows < tq
    tl.store(o + (rows * HQ + h)[:, None] * HEAD_DIM + d[None, :], out, mask=keep[:, None])
    tl.store(lse + rows * HQ + h, row_lse, mask=keep)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attend_rows_over_chunks_of_keys(causal):
    """Chunks of any size (1 key, empty, not multiples of BLOCK_N), folded in reverse order, give the attention over
    all keys; keys past the last chunk hold NaN and are never read into the result."""
    tq, tk, hq, hkv = 45, 61, 2, 1
    q = rand((tq, hq, D), torch.float32, 1, DEVICE)
    k = rand((tk + 20, hkv, D), torch.float32, 2, DEVICE)
    v = rand((tk + 20, hkv, D), torch.float32, 3, DEVICE)
    k[tk:], v[tk:] = float("nan"), float("nan")
    bounds = torch.tensor([0, 13, 13, 14, 50, tk], dtype=torch.int32, device=DEVICE)
    out = poison(torch.empty((tq, hq, D), dtype=torch.float32, device=DEVICE))
    lse = poison(torch.empty((tq, hq), dtype=torch.float32, device=DEVICE))
    off = tk - tq - 10  # the first 10 rows see no key
    _chunked_kernel[(triton.cdiv(tq, 16) * hq,)](q, k, v, out, lse, bounds, bounds.numel() - 1, tq, off,
                                                 D ** -0.5 * LOG2E, hq, hkv, BLOCK_M=16, BLOCK_N=16, HEAD_DIM=D,
                                                 CAUSAL=causal)
    want, want_lse = attention_rows_reference(q, k[:tk], v[:tk], scale=D ** -0.5, causal_offset=off if causal else None)
    _close(out, want, v[:tk], torch.float32, f"chunks causal={causal}")
    _close_lse(lse, want_lse, f"chunks causal={causal}")


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_named():
    q, k, v, cu_q, cu_k = _packed([3, 4], [3, 4], 4, 2, torch.float32, seed=1)
    kw = dict(max_seqlen_q=4, max_seqlen_k=4)
    call = fa.flash_attn_varlen
    cases = [
        (TypeError, "q must be a torch.Tensor", lambda: call(q.tolist(), k, v, cu_q, cu_k, **kw)),
        (ValueError, "q must have 3 dims", lambda: call(q[None], k, v, cu_q, cu_k, **kw)),
        (ValueError, "q must be one of", lambda: call(q.to(torch.int32), k, v, cu_q, cu_k, **kw)),
        (TypeError, "same dtype", lambda: call(q, k.half(), v.half(), cu_q, cu_k, **kw)),
        (ValueError, "multiple of the kv heads", lambda: call(q[:, :3], k, v, cu_q, cu_k, **kw)),
        (ValueError, "k has 2 heads and v 1", lambda: call(q, k, v[:, :1], cu_q, cu_k, **kw)),
        (ValueError, "head dim 32 is not supported", lambda: call(q[..., :32], k[..., :32], v[..., :32], cu_q,
                                                                   cu_k, **kw)),
        (ValueError, "v's head dim is 32", lambda: call(q, k, v[..., :32], cu_q, cu_k, **kw)),
        (ValueError, "expected the same tokens", lambda: call(q, k, v[:-1], cu_q, cu_k, **kw)),
        (ValueError, "q must have a contiguous head dim",
         lambda: call(torch.empty(7, 4, 2 * D, device=DEVICE)[..., ::2], k, v, cu_q, cu_k, **kw)),
        (ValueError, "cu_seqlens_q must be one of torch.int32", lambda: call(q, k, v, cu_q.long(), cu_k, **kw)),
        (ValueError, "cu_seqlens_k must have 1 dims", lambda: call(q, k, v, cu_q, cu_k[None], **kw)),
        (ValueError, "B \\+ 1 >= 2", lambda: call(q, k, v, cu_q[:1], cu_k[:1], **kw)),
        (ValueError, "batch mismatch", lambda: call(q, k, v, cu_q, cu_k[:2], **kw)),
        (ValueError, "non-decreasing prefix sums", lambda: call(q, k, v, cu_q.flip(0), cu_k, **kw)),
        (ValueError, "at most 7", lambda: call(q, k, v, _cu([3, 5]), cu_k, max_seqlen_q=5, max_seqlen_k=4)),
        (ValueError, "max_seqlen_q = 3 but", lambda: call(q, k, v, cu_q, cu_k, max_seqlen_q=3, max_seqlen_k=4)),
        (ValueError, "max_seqlen_k must be an int", lambda: call(q, k, v, cu_q, cu_k, max_seqlen_q=4,
                                                                 max_seqlen_k=4.0)),
        (ValueError, "causal_offsets applies to causal", lambda: call(q, k, v, cu_q, cu_k, **kw,
                                                                      causal_offsets=cu_q[:2])),
        (ValueError, "causal_offsets has 3 entries", lambda: call(q, k, v, cu_q, cu_k, **kw, causal=True,
                                                                  causal_offsets=cu_q)),
        (ValueError, "causal_offsets must be one of torch.int32", lambda: call(q, k, v, cu_q, cu_k, **kw,
                                                                               causal=True,
                                                                               causal_offsets=cu_q[:2].float())),
        (ValueError, "scale must be a positive", lambda: call(q, k, v, cu_q, cu_k, **kw, scale=-1.0)),
        (ValueError, "softcap must be a float >= 0", lambda: call(q, k, v, cu_q, cu_k, **kw, softcap=-2.0)),
        (TypeError, "config must be a FlashAttnConfig", lambda: call(q, k, v, cu_q, cu_k, **kw, config={})),
        (ValueError, "out must be a contiguous \\(7, 4, 64\\)", lambda: call(q, k, v, cu_q, cu_k, **kw,
                                                                           out=torch.empty(7, 4, D).half())),
        (ValueError, "batch mismatch: q has 2", lambda: fa.flash_attn(q.view(1, 7, 4, D).expand(2, 7, 4, D),
                                                                       k.view(1, 7, 2, D), v.view(1, 7, 2, D))),
        (ValueError, "k must have 4 dims", lambda: fa.flash_attn(q.view(1, 7, 4, D), k, v)),
        (ValueError, "block_n must be a power of two", lambda: fa.FlashAttnConfig(block_n=48)),
        (ValueError, "num_stages must be an int >= 1", lambda: fa.FlashAttnConfig(num_stages=0)),
        (ValueError, "num_warps must be one of", lambda: fa.FlashAttnConfig(num_warps=3)),
    ]
    if DEVICE == "cuda":  # devices differ only on a GPU machine; cu_seqlens contents are checked only on the CPU
        cases = [c for c in cases if "prefix sums" not in c[1] and "at most 7" not in c[1] and "but" not in c[1]]
        cases.append((ValueError, "is on cpu", lambda: call(q, k.cpu(), v.cpu(), cu_q, cu_k, **kw)))
    for exc, match, fn in cases:
        with pytest.raises(exc, match=match):
            fn()


# ------------------------------------------------------------------------------------------------ worlds
def _bf16_in_a_world(seed):
    w = this_world()
    for causal in (False, True):
        _varlen_case([37, 1, 70], [37, 20, 70], 4, 1, torch.bfloat16, seed + w.rank, SQUARE, w.device,
                     causal=causal, softcap=5.0 if causal else 0.0)
    return True


def test_bf16_in_the_cpu_world(world2, seed):
    assert all(world2.run(_bf16_in_a_world, seed))


def _tuned_in_a_world(cache_dir):
    """No config: the autotuner is asked (forced to measure here, with a fake timer favouring the smallest key
    block): every rank gets that config and the right result, and the choice lands in the cache file."""
    import os
    from triton_dist import tune
    os.environ["TRITON_DIST_CACHE_DIR"] = cache_dir
    tune._reset()
    real, chosen = tune.choose, []

    def forced(*args, **kwargs):
        cfg = real(*args, force=True, timer=lambda c, run: (run(), c.block_n * 10 + c.num_stages)[1], **kwargs)
        chosen.append(cfg)
        return cfg

    tune.choose = forced
    try:
        w = this_world()
        _varlen_case([9], [9], 1, 1, torch.float32, 4, None, w.device, causal=True)
    finally:
        tune.choose = real
        tune._reset()
    cands = fa.candidate_configs(D, torch.float32, True)
    best = min(cands, key=lambda c: (c.block_n * 10 + c.num_stages, cands.index(c)))
    return chosen == [best], os.path.exists(os.path.join(cache_dir, "tune.json"))


def test_no_config_asks_the_autotuner(world2, tmp_path):
    got = world2.run(_tuned_in_a_world, str(tmp_path))
    assert got == [(True, True), (True, True)], got


# ------------------------------------------------------------------------------------------------ GPU only
def _rows_reference(q, k, v, causal, rows, off):
    """The reference on a subset of the query rows of one sequence (``rows``: a slice), keys all of ``k``."""
    shift = None if not causal else off + rows.start
    return attention_rows_reference(q[rows], k, v, scale=q.shape[-1] ** -0.5, causal_offset=shift)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("tokens", [4096, 16384])
def test_long_bf16_on_gpu(tokens, causal):
    """One sequence of 4k / 16k tokens, D = 128, 32 q / 8 kv heads (the benchmark's shape) through both layouts,
    checked on its first, middle and last 128 rows."""
    if DEVICE != "cuda":
        pytest.skip("a GPU test: the GPU suite runs it")
    bf = torch.bfloat16
    q = rand((tokens, 32, 128), bf, 1, "cuda")
    k = rand((tokens, 8, 128), bf, 2, "cuda")
    v = rand((tokens, 8, 128), bf, 3, "cuda") * 2 - 1
    cu = _cu([tokens], "cuda")
    out, lse = fa.flash_attn_varlen(q, k, v, cu, cu, max_seqlen_q=tokens, max_seqlen_k=tokens, causal=causal,
                                    return_lse=True)
    batched = fa.flash_attn(q[None], k[None], v[None], causal=causal)
    torch.testing.assert_close(batched[0], out, rtol=1e-2, atol=1e-2)
    for start in (0, tokens // 2 - 61, tokens - 128):
        rows = slice(start, start + 128)
        want, want_lse = _rows_reference(q, k, v, causal, rows, 0)
        _close(out[rows], want, v, bf, f"{tokens} rows {start}")
        _close_lse(lse[rows], want_lse, f"{tokens} rows {start}")
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2), is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, sdpa[0].transpose(0, 1), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_bf16_on_gpu(causal):
    """Several sequences of mixed lengths (GQA 32 / 8, D = 128), queries shorter than keys in some (chunked
    prefill), every row checked."""
    if DEVICE != "cuda":
        pytest.skip("a GPU test: the GPU suite runs it")
    lens_q, lens_k = [1000, 3000, 17, 4096, 1], [1000, 3500, 17, 4096, 300]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 32, 8, torch.bfloat16, 5, "cuda", d=128)
    out, lse = fa.flash_attn_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=4096, max_seqlen_k=4096, causal=causal,
                                    return_lse=True)
    want, want_lse = fa.flash_attn_reference(q, k, v, cu_q, cu_k, causal=causal)
    _close(out, want, v, torch.bfloat16, f"varlen causal={causal}")
    _close_lse(lse, want_lse, f"varlen causal={causal}")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_every_candidate_config_on_gpu(d):
    """Each config the tuner may pick (and the default), causal and not, TMA and pointer K/V, on mixed lengths."""
    if DEVICE != "cuda":
        pytest.skip("a GPU test: the GPU suite runs it")
    bf = torch.bfloat16
    lens_q, lens_k = [300, 1000, 77, 1], [300, 1100, 77, 129]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 8, 2, bf, d, "cuda", d=d)
    k_odd = torch.empty((k.shape[0], 2, d + 8), dtype=bf, device="cuda")[..., :d]  # heads not dense: pointers
    k_odd.copy_(k)
    want = {c: fa.flash_attn_reference(q, k, v, cu_q, cu_k, causal=c) for c in (False, True)}
    for causal in (False, True):
        for cfg in dict.fromkeys([fa.default_config(d, bf, causal)] + fa.candidate_configs(d, bf, causal)):
            for kk in (k, k_odd):
                out, lse = fa.flash_attn_varlen(q, kk, v, cu_q, cu_k, max_seqlen_q=1000, max_seqlen_k=1100,
                                                causal=causal, return_lse=True, config=cfg)
                what = f"D={d} causal={causal} {cfg} {'tma' if kk is k else 'ptr'}"
                _close(out, want[causal][0], v, bf, what)
                _close_lse(lse, want[causal][1], what)
