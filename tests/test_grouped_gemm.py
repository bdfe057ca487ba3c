"""The grouped core (``kernels/grouped_gemm.py``) and the MoE routing helpers (``kernels/routing.py``).

CPU (this process, no world): routing exactly equal to its plain-Python reference (stable order, padding, vLLM-style
block experts), gather/combine against torch, the grouped GEMM against fp64 per expert and the fp32 reference's own
error (fp32 and fp16; odd shapes, empty first/middle/last experts, one expert, E=1, both weight layouts and their
transposed storage, the pointer path, split K, persistent and one-tile-per-program grids), poisoned outputs (every
expert row written, rows outside the experts untouched), a whole MoE layer against a dense per-token loop, and bad
input. GPU-only (bf16, prefill and decode sizes against fp64 and torch._grouped_mm's error, no host sync, CUDA graph
capture) at the end."""
import pytest
import torch

from triton_dist.kernels import gemm
from triton_dist.kernels import grouped_gemm as gg
from triton_dist.kernels import routing as rt

from _util import poison, rand
from conftest import BACKEND
from test_gemm_ops import check_gemm

DEVICE = "cpu" if BACKEND == "cpu" else "cuda"  # the GPU suite runs the same tests on its GPU

SPLIT = gg.GroupedGemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, split_k=3, num_stages=1, num_warps=4,
                             persistent=False)
POINTERS = gg.GroupedGemmConfig(block_m=32, block_n=32, block_k=32, group_m=1, num_stages=1, num_warps=4,
                                use_tma=False)
CONFIGS = {"default": None, "split3": SPLIT, "pointers": POINTERS}
# rows per expert: random with zeros; empty first / middle / last; everything in one expert; E = 1; many row tiles
SIZES = {"odd": [5, 0, 13, 1, 17], "empty_ends": [0, 7, 0, 9, 0], "one_expert": [0, 0, 31, 0],
         "e1": [23], "long": [41, 2, 1]}
FIELDS = ("counts", "expert_offsets", "sorted_slots", "gather_index", "scatter_index", "padded_offsets",
          "padded_gather_index", "padded_scatter_index", "block_expert")


def offsets_of(sizes, start=0, device=DEVICE):
    out = [start]
    for s in sizes:
        out.append(out[-1] + s)
    return torch.tensor(out, dtype=torch.int32, device=device)


def make_w(e, k, n, dtype, seed, layout, device=DEVICE):
    """Weights in ``layout``'s logical shape: 'ekn' [E, K, N] and 'enk' [E, N, K] contiguous, 'ekn_t' the [E, K, N]
    view of [E, N, K] storage (TMA on the transposed descriptor), 'strided' every other column (pointer path)."""
    if layout == "ekn":
        return rand((e, k, n), dtype, seed, device), "ekn"
    if layout == "enk":
        return rand((e, n, k), dtype, seed, device), "enk"
    if layout == "ekn_t":
        return rand((e, n, k), dtype, seed, device).transpose(1, 2), "ekn"
    return rand((e, k, 2 * n), dtype, seed, device)[:, :, ::2], "ekn"


def exact_grouped(x, w, offs, w_layout):
    """fp64 per expert; NaN in rows outside every expert (they must stay poisoned)."""
    wk = (w if w_layout == "ekn" else w.transpose(1, 2)).double()
    out = torch.full((x.shape[0], wk.shape[2]), float("nan"), dtype=torch.float64, device=x.device)
    o = offs.tolist()
    for e in range(wk.shape[0]):
        out[o[e]:o[e + 1]] = x[o[e]:o[e + 1]].double() @ wk[e]
    return out


def check_grouped(x, w, offs, w_layout, cfg, what, rows_lo=None, rows_hi=None):
    dtype = x.dtype
    out = poison(torch.empty((x.shape[0], w.shape[2] if w_layout == "ekn" else w.shape[1]), dtype=dtype,
                             device=x.device))
    got = gg.grouped_gemm(x, w, offs, out=out, w_layout=w_layout, config=cfg)
    assert got is out
    lo, hi = int(offs[0]), int(offs[-1])
    assert torch.isnan(got[:lo]).all() and torch.isnan(got[hi:]).all(), f"{what}: rows outside the experts written"
    ref = gg.grouped_gemm_reference(x, w, offs, w_layout)
    check_gemm(got[lo:hi], exact_grouped(x, w, offs, w_layout)[lo:hi], ref[lo:hi], dtype, what)
    return got


# ------------------------------------------------------------------------------------------------ routing
def random_ids(t, k, e, seed, empty=(), device=DEVICE):
    """[t, k] expert ids (distinct per token where k <= E), avoiding the experts in ``empty``."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([x for x in range(e) if x not in empty])
    picks = [allowed[torch.randperm(len(allowed), generator=g)[:k]] if k <= len(allowed) else
             allowed[torch.randint(0, len(allowed), (k,), generator=g)] for _ in range(t)]
    return (torch.stack(picks) if picks else torch.empty((0, k), dtype=torch.int64)).to(device)


ROUTING_CASES = {  # (tokens, k, experts, experts left empty)
    "random": (13, 3, 6, ()), "empty_first_mid_last": (11, 2, 7, (0, 3, 6)), "one_expert": (9, 1, 5, (0, 1, 3, 4)),
    "e1": (6, 1, 1, ()), "k_gt_e": (7, 4, 3, ()), "no_tokens": (0, 2, 4, ()),
}


@pytest.mark.parametrize("block", [None, 16, 5])
@pytest.mark.parametrize("case", ROUTING_CASES)
def test_routing_matches_reference_exactly(case, block):
    t, k, e, empty = ROUTING_CASES[case]
    ids = random_ids(t, k, e, seed=len(case) * 7 + (block or 0), empty=empty)
    for id_dtype in (torch.int64, torch.int32):
        got = rt.build_routing(ids.to(id_dtype), e, block=block)
        ref = rt.routing_reference(ids, e, block=block)
        for f in FIELDS if block else FIELDS[:5]:
            a, b = getattr(got, f), getattr(ref, f)
            same = a.dtype == torch.int32 and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
            assert same, f"{case}: {f}: {a} vs {b}"
        assert (got.num_tokens, got.topk, got.num_experts, got.num_rows) == (t, k, e, t * k)
        flat = torch.arange(t * k, dtype=torch.int32, device=DEVICE)
        assert torch.equal(got.sorted_slots[got.scatter_index.reshape(-1).long()], flat)
        for x in range(e):  # stable: inside an expert, (token, slot) order
            s = got.sorted_slots[got.expert_offsets[x]:got.expert_offsets[x + 1]]
            assert torch.all(s[1:] > s[:-1]) and torch.all(ids.reshape(-1)[s.long()] == x)
        if block:
            assert got.padded_rows % block == 0 and int(got.padded_offsets[-1]) <= got.padded_rows
            assert torch.all((got.padded_offsets[1:] - got.padded_offsets[:-1]) % block == 0)


def test_routing_ids_out_of_range_and_bad_arguments_are_named():
    """Input checks (CPU tensors on every backend: each check raises before anything runs)."""
    ids = torch.tensor([[0, 1], [2, 4]])
    with pytest.raises(ValueError, match=r"topk_ids\[1, 1\] = 4 is not an expert; expected ids in \[0, 4\)"):
        rt.build_routing(ids, 4)
    with pytest.raises(ValueError, match=r"topk_ids\[0, 1\] = -1 is not an expert"):
        rt.build_routing(torch.tensor([[0, -1]]), 4)
    with pytest.raises(TypeError, match="int32 or int64"):
        rt.build_routing(ids.float(), 8)
    with pytest.raises(ValueError, match=r"2-D \[tokens, k\]"):
        rt.build_routing(ids.reshape(-1), 8)
    with pytest.raises(ValueError, match="k = 0 slots"):
        rt.build_routing(torch.empty((3, 0), dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        rt.build_routing(ids, 0)
    with pytest.raises(ValueError, match="block must be None or a positive int"):
        rt.build_routing(ids, 8, block=0)
    with pytest.raises(TypeError, match="topk_ids must be a torch.Tensor"):
        rt.build_routing([[0, 1]], 8)
    r = rt.build_routing(ids, 8)
    x = rand((2, 8), torch.float32, 1, "cpu")
    with pytest.raises(ValueError, match="padded=True needs a routing built with block"):
        rt.gather_rows(x, r, padded=True)
    with pytest.raises(ValueError, match="x has 3 rows, expected 2"):
        rt.gather_rows(rand((3, 8), torch.float32, 1, "cpu"), r)
    with pytest.raises(TypeError, match="routing must be a Routing"):
        rt.gather_rows(x, ids)
    with pytest.raises(ValueError, match="unit stride along hidden"):
        rt.gather_rows(rand((8, 2), torch.float32, 1, "cpu").t(), r)
    y = rand((4, 8), torch.float32, 2, "cpu")
    with pytest.raises(ValueError, match=r"topk_weights must be a float \[2, 2\] tensor"):
        rt.scatter_combine(y, r, torch.ones(2, 3))
    with pytest.raises(ValueError, match="y has 5 rows, expected 4"):
        rt.scatter_combine(rand((5, 8), torch.float32, 2, "cpu"), r, None)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(2, 8\)"):
        rt.scatter_combine(y, r, None, out=torch.empty(2, 8, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("padded", [False, True], ids=["sorted", "padded"])
def test_gather_rows_and_scatter_combine(padded, dtype):
    t, k, e, h = 11, 3, 7, 40
    ids = random_ids(t, k, e, seed=3, empty=(0, 4))
    r = rt.build_routing(ids, e, block=4 if padded else None)
    x = rand((t, h), dtype, 4, DEVICE)
    rows = r.padded_rows if padded else r.num_rows
    got = rt.gather_rows(x, r, padded=padded, out=poison(torch.empty((rows, h), dtype=dtype, device=DEVICE)))
    assert torch.equal(got, rt.gather_rows_reference(x, r, padded=padded))  # every row written; pads are zero
    if padded:
        assert torch.all(got[r.padded_gather_index < 0] == 0)
    y = rand((rows, h), dtype, 5, DEVICE)
    if padded:
        y[r.padded_gather_index < 0] = float("nan")  # pad rows are never read
    wts = torch.rand((t, k), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    for weights in (wts, wts.to(torch.float16), None):
        out = poison(torch.empty((t, h), dtype=dtype, device=DEVICE))
        out = rt.scatter_combine(y, r, weights, padded=padded, out=out)
        ref = rt.scatter_combine_reference(y, r, weights, padded=padded)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6)
        exact = sum((1 if weights is None else weights[:, j, None].double())
                    * y[(r.padded_scatter_index if padded else r.scatter_index)[:, j].long()].double()
                    for j in range(k))
        torch.testing.assert_close(out.double(), exact, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    # a token range in fp32 (one source rank's tokens of a plan): exactly those rows of the fp32 sum
    part = rt.scatter_combine(y, r, wts, padded=padded, tokens=(3, 9), out_dtype=torch.float32,
                              out=poison(torch.empty((6, h), dtype=torch.float32, device=DEVICE)))
    full = rt.scatter_combine(y, r, wts, padded=padded, out_dtype=torch.float32)
    assert torch.equal(part, full[3:9])
    with pytest.raises(ValueError, match=r"tokens must be \(start, stop\) with 0 <= start <= stop <= 11"):
        rt.scatter_combine(y, r, wts, padded=padded, tokens=(5, 12))


# ------------------------------------------------------------------------------------------------ grouped GEMM
@pytest.mark.parametrize("layout", ["ekn", "enk", "ekn_t", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sizes", SIZES)
def test_grouped_gemm_matches_fp64(sizes, dtype, layout):
    rows = SIZES[sizes]
    k, n = 40, 24
    offs = offsets_of(rows)
    x = rand((int(offs[-1]), k), dtype, len(rows), DEVICE)
    w, w_layout = make_w(len(rows), k, n, dtype, 10 + len(rows), layout)
    for name, cfg in CONFIGS.items():
        check_grouped(x, w, offs, w_layout, cfg, f"{sizes} {dtype} {layout} {name}")


def test_rows_outside_the_experts_stay_untouched_and_int64_offsets():
    """Offsets from 3 to R-4 (int64): the first 3 and last 4 rows stay poisoned, with every config."""
    x = rand((30, 40), torch.float32, 1, DEVICE)
    w = rand((3, 40, 24), torch.float32, 2, DEVICE)
    offs = offsets_of([9, 0, 14], start=3).long()
    for cfg in CONFIGS.values():
        check_grouped(x, w, offs, "ekn", cfg, f"partial range {cfg}")


def test_split_k_is_deterministic_and_counters_reset():
    x = rand((19, 96), torch.float32, 1, DEVICE)
    w = rand((3, 96, 24), torch.float32, 2, DEVICE)
    offs = offsets_of([4, 0, 15])
    first = gg.grouped_gemm(x, w, offs, config=SPLIT)
    second = gg.grouped_gemm(x, w, offs, config=SPLIT)
    assert torch.equal(first, second)
    _, counts = gemm._split_k_buffers[gemm.stream_key(x.device)]
    assert int(counts.abs().sum()) == 0, "every tile's counter was reset by its last split"


def test_degenerate_sizes():
    f32 = dict(dtype=torch.float32, device=DEVICE)
    w = rand((3, 40, 24), torch.float32, 2, DEVICE)
    assert gg.grouped_gemm(torch.empty((0, 40), **f32), w, offsets_of([0, 0, 0])).shape == (0, 24)
    out = poison(torch.empty((5, 24), **f32))  # no expert has rows: nothing written
    gg.grouped_gemm(rand((5, 40), torch.float32, 1, DEVICE), w, offsets_of([0, 0, 0]), out=out)
    assert torch.isnan(out).all()
    out = poison(torch.empty((5, 24), **f32))  # K = 0: the product is zero
    gg.grouped_gemm(torch.empty((5, 0), **f32), torch.empty((3, 0, 24), **f32), offsets_of([2, 0, 3]), out=out)
    assert torch.equal(out, torch.zeros_like(out))


def test_padded_routing_feeds_the_grouped_gemm():
    """The padded layout (vLLM's): pad rows are zero inputs, rows past padded_offsets[E] are never written."""
    t, k, e, h, n = 9, 2, 5, 40, 24
    r = rt.build_routing(random_ids(t, k, e, seed=8, empty=(2,)), e, block=16)
    xp = rt.gather_rows(rand((t, h), torch.float32, 1, DEVICE), r, padded=True)
    w = rand((e, n, h), torch.float32, 2, DEVICE)
    got = check_grouped(xp, w, r.padded_offsets, "enk", None, "padded routing")
    pad = (r.padded_gather_index < 0) & (torch.arange(r.padded_rows, device=DEVICE) < int(r.padded_offsets[-1]))
    assert torch.all(got[pad] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_layer_against_a_dense_per_token_loop(dtype):
    """route -> gather -> grouped GEMM -> weighted combine equals sum_j w[t, j] * x[t] @ W[ids[t, j]]."""
    t, k, e, h, n = 10, 2, 6, 40, 24
    ids = random_ids(t, k, e, seed=11, empty=(5,))
    x = rand((t, h), dtype, 1, DEVICE)
    w = rand((e, h, n), dtype, 2, DEVICE) / 8
    wts = torch.softmax(torch.randn((t, k), generator=torch.Generator().manual_seed(3)), -1).to(DEVICE)
    r = rt.build_routing(ids, e)
    y = gg.grouped_gemm(rt.gather_rows(x, r), w, r.expert_offsets)
    got = rt.scatter_combine(y, r, wts)
    exact = torch.stack([sum(wts[i, j].double() * (x[i].double() @ w[ids[i, j]].double()) for j in range(k))
                         for i in range(t)])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["ekn", "enk"])
@pytest.mark.skipif(BACKEND != "cpu", reason="the wrapper's fp32 CPU path; on GPUs (bf16 only) the bench checks it")
def test_torch_grouped_mm_wrapper(layout):
    if not hasattr(torch, "_grouped_mm"):
        got, why = gg.torch_grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8), offsets_of([2]))
        assert got is None and "no torch._grouped_mm" in why
        return
    offs = offsets_of([5, 0, 13, 1])
    x = rand((19, 40), torch.float32, 1, DEVICE)
    w, w_layout = make_w(4, 40, 24, torch.float32, 2, layout)
    got, why = gg.torch_grouped_mm(x, w, offs, w_layout)
    assert why is None, why
    torch.testing.assert_close(got, gg.grouped_gemm_reference(x, w, offs, w_layout), rtol=1e-5, atol=1e-4)
    got, why = gg.torch_grouped_mm(x, rand((4, 41, 24), torch.float32, 3, DEVICE), offs)  # K mismatch: refused
    assert got is None and "torch._grouped_mm refused" in why


def test_configs_and_tile_bound():
    for rows in (1, 16, 100, 128, 4096):
        for fp in (torch.bfloat16, torch.float32):
            kw = dict(n=1792, k=4096, active_experts=8, sms=132)
            cands = gg.candidate_configs(fp, rows, **kw)
            assert cands and len(set(cands)) == len(cands) and all(isinstance(c, gg.GroupedGemmConfig) for c in cands)
            assert gg.default_config(fp, rows, **kw) in cands  # CPU_CONFIG here (the interpreter); GPU sizing below
    # the data-free bound on row tiles holds for every split of the rows
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        e = int(torch.randint(1, 9, (1,), generator=g))
        sizes = torch.randint(0, 40, (e,), generator=g) * torch.randint(0, 2, (e,), generator=g)
        for bm in (16, 64):
            assert sum(-(-int(s) // bm) for s in sizes) <= gg.max_row_tiles(int(sizes.sum()), e, bm)
    # the split that fills waves of 132 SMs best (gemm.wave_split): 112 tiles -> 8 (896 of 924 slots), 2000 -> 1
    assert gg._split_for(8 * 14, 32, 132) == 8 and gg._split_for(2000, 32, 132) == 1
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        gg.GroupedGemmConfig(block_n=48)
    with pytest.raises(ValueError, match="split_k must be an int >= 1"):
        gg.GroupedGemmConfig(split_k=0)
    with pytest.raises(ValueError, match="num_warps must be one of"):
        gg.GroupedGemmConfig(num_warps=3)


def test_grouped_gemm_bad_input_is_named():
    f32 = dict(dtype=torch.float32)
    x, w, offs = torch.ones(6, 8, **f32), torch.ones(2, 8, 4, **f32), offsets_of([2, 4], device="cpu")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        gg.grouped_gemm([[1.0]], w, offs)
    with pytest.raises(ValueError, match="w_layout must be one of"):
        gg.grouped_gemm(x, w, offs, w_layout="kn")
    with pytest.raises(ValueError, match=r"w must be 3-D \[E, K, N\]"):
        gg.grouped_gemm(x, w[0], offs)
    with pytest.raises(ValueError, match=r"expected K = 8 at w.shape\[2\]"):
        gg.grouped_gemm(x, w, offs, w_layout="enk")
    with pytest.raises(TypeError, match="same dtype"):
        gg.grouped_gemm(x, w.half(), offs)
    with pytest.raises(TypeError, match="int8"):
        gg.grouped_gemm(x.to(torch.int8), w.to(torch.int8), offs)
    with pytest.raises(ValueError, match="x must be contiguous"):
        gg.grouped_gemm(torch.ones(8, 6, **f32).t(), w, offs)
    with pytest.raises(ValueError, match=r"expert_offsets must be an int32 or int64 \[3\] tensor"):
        gg.grouped_gemm(x, w, offs[:2])
    with pytest.raises(ValueError, match=r"expert_offsets must be an int32 or int64 \[3\] tensor"):
        gg.grouped_gemm(x, w, offs.float())
    with pytest.raises(ValueError, match="non-decreasing from >= 0 to <= 6"):
        gg.grouped_gemm(x, w, torch.tensor([0, 4, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing from >= 0 to <= 6"):
        gg.grouped_gemm(x, w, torch.tensor([0, 4, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"out must be a contiguous \(6, 4\)"):
        gg.grouped_gemm(x, w, offs, out=torch.empty(6, 5, **f32))
    with pytest.raises(TypeError, match="config must be a GroupedGemmConfig"):
        gg.grouped_gemm(x, w, offs, config=object())


# ------------------------------------------------------------------------------------------------ GPU only
def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return torch.device("cuda", torch.cuda.current_device())


def _skewed_sizes(e, total, seed, zeros):
    """``e`` expert sizes summing to ``total``, ``zeros`` of them empty (first, last and one in the middle first)."""
    g = torch.Generator().manual_seed(seed)
    empty = [0, e - 1, e // 2][:zeros] + torch.randperm(e, generator=g)[:max(0, zeros - 3)].tolist()
    share = torch.rand(e, generator=g) ** 2
    share[list(set(empty))] = 0
    sizes = (share / share.sum() * total).floor().long()
    sizes[int(share.argmax())] += total - int(sizes.sum())
    return sizes.tolist()


def _gpu_check(sizes, k, n, layout, device, seed, config=None):
    dtype = torch.bfloat16
    offs = offsets_of(sizes, device=device)
    x = rand((sum(sizes), k), dtype, seed, device)
    w = (rand((len(sizes), k, n) if layout == "ekn" else (len(sizes), n, k), dtype, seed + 1, device)
         / k ** 0.5).to(dtype)
    out = poison(torch.empty((sum(sizes), n), dtype=dtype, device=device))
    got = gg.grouped_gemm(x, w, offs, out=out, w_layout=layout, config=config)
    theirs, why = gg.torch_grouped_mm(x, w, offs, layout)
    if theirs is None:  # torch's own bf16 path per expert
        wk = w if layout == "ekn" else w.transpose(1, 2)
        o = offs.tolist()
        theirs = torch.cat([x[o[e]:o[e + 1]] @ wk[e] for e in range(len(sizes))])
    torch.cuda.synchronize()
    check_gemm(got, exact_grouped(x, w, offs.cpu(), layout), theirs, dtype,
               f"grouped bf16 {len(sizes)} experts, K={k} N={n} {layout} {config}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_grouped_gemm_prefill_bf16_on_gpu(layout):
    dev = _gpu()
    _gpu_check([4096] * 8, 4096, 1792, layout, dev, seed=1)  # DESIGN.md's torch._grouped_mm case
    _gpu_check(_skewed_sizes(8, 8 * 4096 - 5, seed=2, zeros=3), 4096, 1792, layout, dev, seed=2)
    _gpu_check(_skewed_sizes(64, 16384 + 3, seed=3, zeros=5), 2048, 1536, layout, dev, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_grouped_gemm_decode_bf16_on_gpu(layout):
    dev = _gpu()
    for rows in (1, 4, 16, 64, 128):
        _gpu_check([rows] * 8, 4096, 1792, layout, dev, seed=rows)  # few experts: split K
        _gpu_check(_skewed_sizes(128, rows * 16, seed=rows, zeros=3), 2048, 1536, layout, dev, seed=rows + 1)
    cands = gg.candidate_configs(torch.bfloat16, 16, n=1792, k=4096, active_experts=8, sms=gemm.core_sms(dev))
    for cfg in cands[::3]:  # a spread of what an autotuner may pick (each config compiles for seconds)
        _gpu_check([16] * 8, 4096, 1792, layout, dev, seed=5, config=cfg)


@pytest.mark.gpu
def test_moe_pipeline_has_no_host_sync_and_captures_in_a_cuda_graph():
    dev = _gpu()
    t, k, e, h, n = 64, 8, 128, 2048, 1536
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randn((t, e), generator=g, device=dev).topk(k, dim=-1).indices
    wts = torch.rand((t, k), generator=g, device=dev)
    x = torch.randn((t, h), generator=g, device=dev).to(torch.bfloat16)
    w = (torch.randn((e, n, h), generator=g, device=dev) / h ** 0.5).to(torch.bfloat16)

    def layer():
        r = rt.build_routing(ids, e, block=16)
        y = gg.grouped_gemm(rt.gather_rows(x, r, padded=True), w, r.padded_offsets, w_layout="enk")
        return rt.scatter_combine(y, r, wts, padded=True)

    eager = layer()  # first call: scratch buffers, compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside raises
    try:
        again = layer()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(again, eager)
    exact = torch.zeros((t, n), dtype=torch.float64, device=dev)
    for j in range(k):
        exact += wts[:, j, None].double() * torch.einsum("th,tnh->tn", x.double(), w[ids[:, j]].double())
    torch.testing.assert_close(eager.double(), exact, rtol=0.03, atol=0.03 * exact.abs().max().item())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer()  # warm this stream's scratch before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            captured = layer()
    torch.cuda.current_stream().wait_stream(side)
    ids.copy_(torch.roll(ids, 1, 0))  # new routing, same shapes
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, layer()), "graph replay of the routed layer differs from eager"
