"""Local split-KV flash-decode (``kernels/attention/flash_decode.py``) against its fp32 torch reference.
CPU: fp32 and fp16 in this process, bf16 inside a world (the interpreter's bf16 is mended by ``triton_dist.init()``);
contiguous and paged caches (shuffled block tables, pages of 1 to 64 keys, one page id per tile and one per key), odd
and empty lengths, GQA groups 1/4/8 and several head blocks, softcap, lse, one split and several (spans longer than
some sequences), the combine alone, determinism, bad input. GPU-only (bf16 at the issue's shapes, CUDA graphs with
lengths changing between replays) at the end."""
import types

import pytest
import torch

from triton_dist.kernels import gemm
from triton_dist.kernels.attention import _common as ac
from triton_dist.kernels.attention import flash_decode as fd

from _util import poison, rand, this_world
from conftest import BACKEND

# Triton 3.6's interpreter takes a loop bound loaded from memory (the kernel's key range) as a 1-element array
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
DEVICE = "cpu" if BACKEND == "cpu" else "cuda"  # the GPU suite runs the same tests on its GPU
# fp32: full fp32 dots (DOT_PRECISION "ieee": exact in the interpreter, FMA order on a GPU); 16-bit: p and the output
# are rounded, the q.k products (so the lse) are exact in fp32
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LSE_TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}
SPLIT3 = fd.FlashDecodeConfig(block_n=32, num_stages=1, programs_per_sm=2, splits=3)
ONE = fd.FlashDecodeConfig(block_n=32, num_stages=1, programs_per_sm=2, splits=1)
I32 = dict(dtype=torch.int32, device=DEVICE)


def _cache(b, t, hkv, d, dtype, seed, page, device):
    """k, v and the block table (None: contiguous [B, T, Hkv, D]); paged: every sequence's pages shuffled among
    spare ones, unused table entries -1 (never read)."""
    if not page:
        return rand((b, t, hkv, d), dtype, seed, device), rand((b, t, hkv, d), dtype, seed + 1, device), None
    per = -(-t // page)
    pages = b * per + 3
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(pages, generator=g)[:b * per].view(b, per).to(torch.int32)
    k = rand((pages, page, hkv, d), dtype, seed, device)
    v = rand((pages, page, hkv, d), dtype, seed + 1, device)
    return k, v, table.to(device)


def _check(got, want, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: NaN/inf in the output (unwritten, poisoned elements?)"
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype], msg=what)


def _case(lens, hq, hkv, dtype, seed, *, t=None, d=64, page=0, softcap=0.0, scale=None, cfg=SPLIT3,
          device=DEVICE, out_dtype=None):
    b = len(lens)
    t = t or max(max(lens), 1)
    q = rand((b, hq, d), dtype, seed, device)
    k, v, table = _cache(b, t, hkv, d, dtype, seed + 2, page, device)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    if table is not None:  # entries past a sequence's pages are never read
        used = torch.arange(table.shape[1], device=device)[None, :] < (kv_lens[:, None] + page - 1) // page
        table = torch.where(used, table, torch.full_like(table, -1))
    out = poison(torch.empty((b, hq, d), dtype=out_dtype or dtype, device=device))
    got, lse = fd.flash_decode(q, k, v, kv_lens, block_table=table, scale=scale, softcap=softcap, return_lse=True,
                               out=out, config=cfg)
    assert got is out and lse.shape == (b, hq) and lse.dtype == torch.float32
    want, want_lse = fd.flash_decode_reference(q, k, v, kv_lens, block_table=table, scale=scale, softcap=softcap)
    what = f"flash_decode lens={lens} {hq}/{hkv} heads {dtype} page={page} softcap={softcap} {cfg}"
    _check(got, want, dtype, what)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=LSE_TOL[dtype], msg=f"{what}: lse")
    assert torch.equal(torch.isinf(lse), torch.tensor(lens, device=device)[:, None].expand(b, hq) == 0)
    return got


@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_contiguous_matches_reference(dtype, ratio):
    """Odd lengths, an empty sequence, the bound itself (257: a partial last tile), direct output and partials."""
    for cfg in (SPLIT3, ONE):
        _case([37, 0, 257, 1], 2 * ratio, 2, dtype, seed=ratio, t=257, cfg=cfg)


@pytest.mark.parametrize("page", [1, 16, 24, 64])
def test_paged_matches_reference(page):
    """Pages smaller than the tile (one id per key), not a power of two, and a tile inside one page (one id per
    tile); shuffled tables with unused -1 entries."""
    dtype = torch.float16 if page % 2 else torch.float32
    _case([37, 200, 0, 1], 8, 2, dtype, seed=page, t=200, page=page)


def test_softcap_scale_and_out_dtype():
    _case([60, 9], 8, 2, torch.float16, seed=3, softcap=2.0, scale=0.3, cfg=SPLIT3)
    _case([60, 9], 8, 2, torch.float16, seed=4, softcap=1.5, page=16, cfg=ONE)
    _case([60, 9], 8, 2, torch.float16, seed=5, cfg=SPLIT3, out_dtype=torch.float32)  # partials to merge again


def test_mqa_with_several_head_blocks():
    """128 q heads on one kv head: 64-row blocks, each streaming the keys again."""
    assert fd.block_h(128, 64) == 64
    _case([33, 5], 128, 1, torch.float32, seed=6, cfg=SPLIT3)


def test_splits_longer_than_sequences_are_empty():
    """4 splits of 64 keys for a bound of 256: the splits past a short sequence attend to nothing (lse -inf, out 0
    in the workspace) and the merge ignores them."""
    cfg = fd.FlashDecodeConfig(block_n=32, num_stages=1, programs_per_sm=2, splits=4)
    lens = [1, 37, 0, 256]
    _case(lens, 8, 2, torch.float32, seed=7, t=256, cfg=cfg)
    assert fd.split_plan(cfg, 8, 256, 4) == (4, 64)
    ws = fd._workspaces[gemm.stream_key(torch.empty(0, device=DEVICE).device)]  # (cuda:0, not cuda)
    n = len(lens) * 8 * 4
    parts = ws[:n * 64].view(len(lens), 8, 4, 64)
    lses = ws[n * 64:n * 65].view(len(lens), 8, 4)
    for b, length in enumerate(lens):
        for s in range(4):
            empty = length <= 64 * s
            assert bool(torch.isinf(lses[b, :, s]).all()) == empty, (b, s)
            if empty:
                assert torch.equal(parts[b, :, s], torch.zeros_like(parts[b, :, s]))


def test_default_config_splits_in_the_cpu_world():
    """No config: CPU_CONFIG, whose 2 'programs per SM' on 4 'SMs' split a batch of one kv head."""
    if DEVICE == "cpu":
        assert fd.split_plan(fd.CPU_CONFIG, 1, 300, gemm.core_sms(torch.device("cpu")))[0] > 1
    _case([300], 4, 1, torch.float16, seed=8, cfg=None)


@pytest.mark.parametrize("parts_n", [1, 5, 70])
def test_combine_partials_matches_reference(parts_n):
    """Any P (70 at D 128: two chunks of 64), empty parts (lse -inf, values ignored) and rows with every part
    empty (out 0, lse -inf); fp32 and fp16 outputs."""
    b, hq, d = 2, 3, 128
    parts = rand((b, hq, parts_n, d), torch.float32, parts_n, DEVICE)
    lses = rand((b, hq, parts_n), torch.float32, parts_n + 1, DEVICE) * 3
    lses[0, 0, ::2] = float("-inf")
    lses[1, 2] = float("-inf")
    want, want_lse = ac.merge_partials_reference(parts, lses, dim=2)
    parts[torch.isinf(lses)] = float("nan")  # an empty part's values must not matter
    for dtype in (torch.float32, torch.float16):
        out = poison(torch.empty((b, hq, d), dtype=dtype, device=DEVICE))
        lse = poison(torch.empty((b, hq), dtype=torch.float32, device=DEVICE))
        assert fd.combine_partials(parts, lses, out=out, lse_out=lse) is out
        torch.testing.assert_close(out.float(), want, rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1, 2].float(), torch.zeros(d, device=DEVICE)) and lse[1, 2] == float("-inf")


def test_deterministic():
    q = rand((2, 8, 64), torch.float32, 1, DEVICE)
    k, v, _ = _cache(2, 200, 2, 64, torch.float32, 2, 0, DEVICE)
    lens = torch.tensor([200, 77], **I32)
    first = fd.flash_decode(q, k, v, lens, config=SPLIT3)
    assert torch.equal(first, fd.flash_decode(q, k, v, lens, config=SPLIT3))


def test_empty_batch_and_empty_cache():
    q = rand((2, 4, 64), torch.float32, 1, DEVICE)
    k = torch.empty((2, 0, 1, 64), device=DEVICE)
    out, lse = fd.flash_decode(q, k, k, torch.zeros(2, **I32), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isinf(lse).all())
    got = fd.flash_decode(q[:0], k[:0], k[:0], torch.zeros(0, **I32))
    assert got.shape == (0, 4, 64)


def test_strided_inputs():
    """k / v halves of one [B, T, 2, Hkv, D] tensor, q with a row stride that is not a multiple of 16 (the unaligned
    path): unit stride along D is all that is needed."""
    kv = rand((2, 90, 2, 2, 64), torch.float32, 1, DEVICE)
    q = rand((2, 8, 72), torch.float32, 2, DEVICE)[..., :64]
    lens = torch.tensor([90, 41], **I32)
    got = fd.flash_decode(q, kv[:, :, 0], kv[:, :, 1], lens, config=SPLIT3)
    want, _ = fd.flash_decode_reference(q, kv[:, :, 0], kv[:, :, 1], lens)
    _check(got, want, torch.float32, "strided")


def test_split_plan_and_configs():
    """Splits from the bound, the batch, the kv heads and the SMs only; the GPU candidates fit the shared memory."""
    cfg = fd.FlashDecodeConfig(block_n=64, programs_per_sm=2)
    for b, t in ((1, 4096), (1, 32768), (1, 131072), (16, 8192), (64, 4096)):
        splits, span = fd.split_plan(cfg, b * 8, t, 132)
        assert span % 64 == 0 and splits * span >= t > (splits - 1) * span and splits <= cfg.max_splits
        assert span >= cfg.min_split_tokens or splits == 1
        if b * t >= 16384:  # 64 MB of bf16 KV at D 128, 8 kv heads: one wave of 264 slots at least 90 % full
            assert 0.9 * 264 <= b * 8 * splits <= 264 or splits == 1, (b, t, splits)
    assert fd.split_plan(cfg, 512, 4096, 132) == (1, 4096)
    assert fd.split_plan(fd.FlashDecodeConfig(block_n=64, splits=5), 8, 300, 132) == (5, 64)
    gpu = types.SimpleNamespace(runtime=types.SimpleNamespace(interpret=False))
    real = fd.knobs
    fd.knobs = gpu
    try:
        for d in ac.HEAD_DIMS:
            for page in (None, 16):
                cands = fd.candidate_configs(1, 32, 8, d, 32768, torch.bfloat16, 132, page)
                assert 4 <= len(cands) <= 10 and len(set(cands)) == len(cands)
                assert fd.default_config(1, 32, 8, d, 32768, torch.bfloat16, 132) == cands[0]
                for c in cands:
                    assert fd.smem_bytes(c.block_n, d, torch.bfloat16, c.num_stages) <= fd.SMEM_BUDGET, c
    finally:
        fd.knobs = real
    assert fd.kernel_stages(cfg, 0) == 3 and fd.kernel_stages(cfg, 16) == 5


def test_no_config_asks_the_autotuner(monkeypatch):
    """config=None: one tune.choose call per launch, kernel "flash_decode", a JSON key of the shape bucket (dtype, D,
    heads, batch and bound buckets, page size), the candidates and a bench that launches the kernel."""
    import json
    calls = []

    def choose(kernel, key, configs, default, bench, *, version):
        calls.append((kernel, key, version, configs(), default()))
        bench(SPLIT3)  # what the tuner's timing runs do
        return SPLIT3

    monkeypatch.setattr(fd.tune, "choose", choose)
    got = _case([77, 3, 0], 8, 2, torch.float16, seed=9, t=200, page=16, cfg=None)
    assert got.shape == (3, 8, 64)
    (kernel, key, version, cands, default), = calls
    assert (kernel, version) == ("flash_decode", fd.KERNEL_VERSION)
    assert key == ("torch.float16", 64, 8, 2, 4, 256, 16) and json.loads(json.dumps(key)) == list(key)
    assert default in cands or DEVICE == "cpu"


def test_bad_input_is_named():
    f32 = dict(dtype=torch.float32, device=DEVICE)
    q = torch.ones(2, 8, 64, **f32)
    k = torch.ones(2, 16, 2, 64, **f32)
    lens = torch.tensor([3, 16], **I32)
    table = torch.zeros(2, 2, **I32)
    pages = torch.ones(4, 8, 2, 64, **f32)
    k3 = torch.ones(2, 16, 3, 64, **f32)
    cases = [
        (TypeError, "q must be a torch.Tensor", ([1.0], k, k, lens), {}),
        (ValueError, "q has 8 heads and k/v 3", (q, k3, k3, lens), {}),
        (ValueError, "head dim 32 is not supported", (q[..., :32], k[..., :32], k[..., :32], lens), {}),
        (ValueError, "k_cache is \\(2, 16, 2, 64\\) and v_cache \\(2, 16, 2, 128\\)",
         (q, k, torch.ones(2, 16, 2, 128, **f32), lens), {}),
        (TypeError, "same dtype", (q, k.half(), k.half(), lens), {}),
        (ValueError, "kv_lens must be one of torch.int32", (q, k, k, lens.long()), {}),
        (ValueError, "block_table must be one of torch.int32", (q, pages, pages, lens), dict(block_table=table.long())),
        (ValueError, "kv_lens has 3 entries, expected 2", (q, k, k, torch.tensor([1, 2, 3], **I32)), {}),
        (ValueError, "block_table has 3 rows, expected 2", (q, pages, pages, lens),
         dict(block_table=torch.zeros(3, 2, **I32))),
        (ValueError, "must have q's batch 2", (q, torch.ones(3, 16, 2, 64, **f32), torch.ones(3, 16, 2, 64, **f32),
                                               lens), {}),
        (ValueError, "kv_lens must be in \\[0, 16\\]", (q, k, k, torch.tensor([3, 17], **I32)), {}),
        (ValueError, "kv_lens must be in \\[0, 16\\]", (q, pages, pages, torch.tensor([-1, 2], **I32)),
         dict(block_table=table)),
        (ValueError, "block_table\\[1, 1\\] = 4 is not a page", (q, pages, pages, lens),
         dict(block_table=torch.tensor([[0, 9], [1, 4]], **I32))),
        (ValueError, "block_table must have a unit stride", (q, pages, pages, lens),
         dict(block_table=torch.zeros(2, 2, **I32).t())),
        (ValueError, "unit stride along the head dim", (q, k.transpose(1, 3).contiguous().transpose(1, 3),
                                                       k, lens), {}),
        (ValueError, "out must be a contiguous \\(2, 8, 64\\)", (q, k, k, lens),
         dict(out=torch.empty(2, 8, 32, **f32))),
        (ValueError, "out_dtype must be one of", (q, k, k, lens), dict(out_dtype=torch.int32)),
        (ValueError, "softcap must be a finite float >= 0", (q, k, k, lens), dict(softcap=-1.0)),
        (TypeError, "config must be a FlashDecodeConfig", (q, k, k, lens), dict(config={"block_n": 64})),
    ]
    if DEVICE == "cuda":  # length and page values are not checked on the GPU (no sync): those cases do not apply
        cases = [c for c in cases if "kv_lens must be in" not in c[1] and "is not a page" not in c[1]]
        cases.append((ValueError, "kv_lens is on cpu, expected cuda", (q, k, k, lens.cpu()), {}))
    for exc, msg, args, kwargs in cases:
        with pytest.raises(exc, match=msg):
            fd.flash_decode(*args, **kwargs)
    with pytest.raises(ValueError, match="lses is \\(2, 8, 3\\), expected \\(2, 8, 4\\)"):
        fd.combine_partials(torch.ones(2, 8, 4, 64, **f32), torch.ones(2, 8, 3, **f32), out=q)
    with pytest.raises(ValueError, match="out is on meta, expected"):
        fd.combine_partials(torch.ones(2, 8, 4, 64, **f32), torch.ones(2, 8, 4, **f32),
                            out=torch.empty(2, 8, 64, device="meta"))
    with pytest.raises(ValueError, match="parts must be one of torch.float32"):
        fd.combine_partials(torch.ones(2, 8, 4, 64, dtype=torch.float16, device=DEVICE), torch.ones(2, 8, 4, **f32),
                            out=q)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        fd.FlashDecodeConfig(block_n=48)
    with pytest.raises(ValueError, match="splits must be an int >= 0"):
        fd.FlashDecodeConfig(splits=-1)


def _bf16_in_a_world(seed):
    w = this_world()
    _case([37, 0, 130], 8, 2, torch.bfloat16, seed + w.rank, cfg=SPLIT3, device=w.device)
    _case([37, 0, 130], 8, 2, torch.bfloat16, seed + w.rank, page=16, cfg=ONE, device=w.device)
    return True


def test_bf16_in_the_cpu_world(world2, seed):
    assert all(world2.run(_bf16_in_a_world, seed))


# ------------------------------------------------------------------------------------------------ GPU only
def _gpu_only():
    if DEVICE != "cuda":
        pytest.skip("a GPU test: the GPU suite runs it")


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,page", [(1, 4096, 0), (1, 32768, 0), (1, 32768, 16), (16, 8192, 128), (16, 8192, 0),
                                      (64, 4096, 16), (64, 4096, 0)])
def test_flash_decode_bf16_on_gpu(b, t, page):
    """The issue's shapes (D 128, 32 q / 8 kv heads), the tuner's choice, lengths from 1 to the bound."""
    _gpu_only()
    g = torch.Generator().manual_seed(b + t)
    lens = torch.randint(1, t + 1, (b,), generator=g)
    lens[0] = t
    _case(lens.tolist(), 32, 8, torch.bfloat16, seed=b * t, t=t, d=128, page=page, cfg=None, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("page", [0, 16])
def test_flash_decode_replays_in_a_cuda_graph(page):
    """Captured once (after a first call on the capturing stream: it tunes and makes the workspace), replayed with
    new queries and lengths: the split count comes from the bound, so every replay is right."""
    _gpu_only()
    b, hq, hkv, d, t = 2, 32, 8, 128, 32768
    q = rand((b, hq, d), torch.bfloat16, 1, "cuda")
    k, v, table = _cache(b, t, hkv, d, torch.bfloat16, 2, page, "cuda")
    lens = torch.tensor([t, 5], dtype=torch.int32, device="cuda")
    out = torch.empty((b, hq, d), dtype=torch.bfloat16, device="cuda")
    lse = torch.empty((b, hq), dtype=torch.float32, device="cuda")

    def call():
        o, s = fd.flash_decode(q, k, v, lens, block_table=table, return_lse=True, out=out)
        lse.copy_(s)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        call()
    for seed, new in enumerate(([1, t], [0, 4097], [t - 1, 300])):
        q.copy_(rand((b, hq, d), torch.bfloat16, 10 + seed, "cuda"))
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        poison(out)
        graph.replay()
        torch.cuda.synchronize()
        want, want_lse = fd.flash_decode_reference(q, k, v, lens, block_table=table)
        _check(out, want, torch.bfloat16, f"replay {seed} lens {new}")
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [0, 16, 128])
def test_every_candidate_config_on_gpu(page):
    """Whatever the tuner picks is right: every candidate at a mid shape, contiguous and paged."""
    _gpu_only()
    for cfg in fd.candidate_configs(2, 32, 8, 128, 8192, torch.bfloat16, gemm.core_sms(torch.device("cuda")), page):
        _case([8192, 1000], 32, 8, torch.bfloat16, seed=cfg.block_n, t=8192, d=128, page=page, cfg=cfg,
              device="cuda")


@pytest.mark.gpu
def test_out_of_range_lengths_and_pages_are_clamped_on_gpu():
    """On the GPU nothing is checked (no sync): a length past the bound is clamped to it, and a page id past the
    cache reads some page of the cache (no fault)."""
    _gpu_only()
    q = rand((2, 8, 128), torch.bfloat16, 1, "cuda")
    k, v, _ = _cache(2, 512, 2, 128, torch.bfloat16, 2, 0, "cuda")
    got = fd.flash_decode(q, k, v, torch.tensor([10_000, 7], dtype=torch.int32, device="cuda"))
    want, _ = fd.flash_decode_reference(q, k, v, torch.tensor([512, 7], dtype=torch.int32))
    _check(got, want, torch.bfloat16, "clamped length")
    kp, vp, table = _cache(2, 512, 2, 128, torch.bfloat16, 3, 16, "cuda")
    table[0, 3] = 1 << 30
    table[1, 0] = -5
    got = fd.flash_decode(q, kp, vp, torch.tensor([512, 100], dtype=torch.int32, device="cuda"), block_table=table)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
