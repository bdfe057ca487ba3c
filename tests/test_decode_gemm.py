"""The decode core (``kernels/decode_gemm.py``): skinny ``a @ b`` with split-K against fp64 and torch's own error.
CPU: fp32 and fp16 in this process (no world needed), bf16 inside a world (the interpreter's bf16 is mended by
``triton_dist.init()``); odd shapes, the three B layouts, split 1 and split > 1, poisoned outputs, determinism, bad
input. GPU-only (bf16, the issue's projection shapes and every decode M) at the end."""
import pytest
import torch

from triton_dist.kernels import decode_gemm as dg
from triton_dist.kernels import gemm

from _util import poison, rand, this_world
from conftest import BACKEND
from test_gemm_ops import LAYOUTS, check_gemm, make_b

DEVICE = "cpu" if BACKEND == "cpu" else "cuda"  # the GPU suite runs the same tests on its GPU

SPLIT2 = dg.DecodeGemmConfig(block_m=16, block_n=16, block_k=16, split_k=3, num_stages=1, num_warps=4)
ONE = dg.DecodeGemmConfig(block_m=16, block_n=32, block_k=32, split_k=1, num_stages=1, num_warps=4)
# a persistent walk: more (tile, split) units than programs (4 'SMs' in the CPU world), each program several
PERSIST = dg.DecodeGemmConfig(block_m=16, block_n=16, block_k=16, split_k=3, num_stages=1, num_warps=4,
                              persistent=True)


def _check(m, k, n, dtype, layout, cfg, seed, device=DEVICE):
    a = rand((m, k), dtype, seed, device)
    b = make_b(k, n, dtype, seed + 1, layout, device)
    out = poison(torch.empty((m, n), dtype=dtype, device=device))
    got = dg.decode_gemm(a, b, out=out, config=cfg)
    assert got is out
    ref = dg.decode_gemm_reference(a.float(), b.float()).to(dtype) if device == "cpu" else \
        dg.decode_gemm_reference(a, b)
    check_gemm(got, a.double() @ b.double(), ref, dtype, f"decode_gemm {m}x{k}x{n} {dtype} {layout} {cfg}")
    return a, b, got


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mkn", [(1, 96, 40), (5, 100, 24), (17, 64, 33)], ids=["m1", "m5_k100", "m17"])
def test_decode_gemm_matches_fp64(mkn, dtype, layout):
    m, k, n = mkn
    for cfg in (SPLIT2, ONE, PERSIST, None):  # None: the default config (CPU_CONFIG: split 2)
        _check(m, k, n, dtype, layout, cfg, seed=m * 1000 + k)


def test_split_k_is_deterministic_and_counters_reset():
    """Two calls give the same bits (partials summed in split order) and the per-tile counters are back at 0."""
    a = rand((3, 160), torch.float32, 1, DEVICE)
    b = rand((160, 48), torch.float32, 2, DEVICE)
    first = dg.decode_gemm(a, b, config=SPLIT2)
    second = dg.decode_gemm(a, b, config=SPLIT2)
    assert torch.equal(first, second)
    _, counts = gemm._split_k_buffers[gemm.stream_key(a.device)]
    assert int(counts.abs().sum()) == 0, "every tile's counter was reset by its last split"


def test_pdl_gives_the_same_bits():
    """``pdl=True`` changes how the kernel is launched, not what it computes (in the CPU world it is ignored)."""
    a = rand((3, 160), torch.float32, 1, DEVICE)
    b = rand((160, 48), torch.float32, 2, DEVICE)
    assert torch.equal(dg.decode_gemm(a, b, config=SPLIT2, pdl=True), dg.decode_gemm(a, b, config=SPLIT2))


def test_more_splits_than_k_tiles_and_m_up_to_the_limit():
    cfg = dg.DecodeGemmConfig(block_m=64, block_n=16, block_k=64, split_k=16, num_stages=1, num_warps=4)
    _check(70, 100, 20, torch.float32, "row", cfg, seed=5)  # 2 K tiles: 2 splits, 2 row tiles


def test_defaults_and_candidates_are_sane():
    for m in (1, 16, 64, 256):
        cfg = dg.default_config(m, 4096, 12288, torch.bfloat16, 132)
        assert isinstance(cfg, dg.DecodeGemmConfig)
        cands = dg.candidate_configs(m, 4096, 12288, torch.bfloat16, 132)
        assert cands and len(set(cands)) == len(cands)
        for c in cands + [cfg]:  # every config's pipeline fits the shared memory
            assert (c.block_m + c.block_n) * c.block_k * 2 * c.num_stages <= dg.SMEM_BUDGET, c
    # the split that fills waves of 132 SMs best, each split >= MIN_K_TILES K tiles (GPU sizing): Qwen3-8B's down
    # (64 column tiles, 48 K tiles) -> 2 (128 programs), its QKV (96, 16) -> 4 (384 of 396), gate/up (384) -> 1
    assert dg._split_for(64, 48, 132) == 2 and dg._split_for(96, 16, 132) == 4 and dg._split_for(384, 16, 132) == 1
    assert dg._split_for(8, 4, 132) == 1  # too few K tiles to split


def test_empty_k_and_n():
    a = rand((3, 8), torch.float32, 1, DEVICE)
    out = poison(torch.empty((3, 5), dtype=torch.float32, device=DEVICE))
    assert torch.equal(dg.decode_gemm(a[:, :0], torch.empty((0, 5), device=DEVICE), out=out), torch.zeros(3, 5,
                                                                                                          device=DEVICE))
    assert dg.decode_gemm(a, torch.empty((8, 0), device=DEVICE)).shape == (3, 0)


def test_bad_input_is_named():
    f32 = dict(dtype=torch.float32, device=DEVICE)
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        dg.decode_gemm([[1.0]], torch.ones(1, 4, **f32))
    with pytest.raises(ValueError, match="the decode core takes 1 to 256"):
        dg.decode_gemm(torch.ones(257, 8, **f32), torch.ones(8, 4, **f32))
    with pytest.raises(ValueError, match="expected b.shape\\[0\\] == a.shape\\[1\\]"):
        dg.decode_gemm(torch.ones(2, 8, **f32), torch.ones(9, 4, **f32))
    with pytest.raises(TypeError, match="same dtype"):
        dg.decode_gemm(torch.ones(2, 8, **f32), torch.ones(8, 4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="a must be contiguous"):
        dg.decode_gemm(torch.ones(8, 2, **f32).t(), torch.ones(8, 4, **f32))
    with pytest.raises(ValueError, match="out must be a contiguous \\(2, 4\\)"):
        dg.decode_gemm(torch.ones(2, 8, **f32), torch.ones(8, 4, **f32), out=torch.empty(4, 2, **f32))
    with pytest.raises(TypeError, match="int8"):
        dg.decode_gemm(torch.ones(2, 8, dtype=torch.int8, device=DEVICE), torch.ones(8, 4, dtype=torch.int8,
                                                                                      device=DEVICE))
    with pytest.raises(ValueError, match="split_k must be an int >= 1"):
        dg.DecodeGemmConfig(split_k=0)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        dg.DecodeGemmConfig(block_n=48)


def _bf16_in_a_world(seed):
    w = this_world()
    for layout in LAYOUTS:
        _check(6, 96, 40, torch.bfloat16, layout, SPLIT2, seed + w.rank, w.device)
    return True


def test_bf16_in_the_cpu_world(world2, seed):
    assert all(world2.run(_bf16_in_a_world, seed))


def _tuned_in_a_world(cache_dir):
    """decode_gemm without a config asks the autotuner, collectively; forced to measure here (the CPU world uses
    defaults) with a fake timer that favours the widest block and the largest split: every rank gets that config
    and the right result, and the choice lands in the cache file."""
    import os
    from triton_dist import tune
    os.environ["TRITON_DIST_CACHE_DIR"] = cache_dir
    tune._reset()
    real = tune.choose
    chosen = []

    def forced(*args, **kwargs):
        cfg = real(*args, force=True, timer=lambda c, run: (run(), 1000.0 - c.block_n - c.split_k)[1], **kwargs)
        chosen.append(cfg)
        return cfg

    tune.choose = forced
    try:
        w = this_world()
        _check(3, 1024, 128, torch.float32, "t", None, seed=7, device=w.device)
    finally:
        tune.choose = real
        tune._reset()
    cands = dg.candidate_configs(3, 128, 1024, torch.float32, gemm.core_sms(w.device))
    best = max(cands, key=lambda c: (c.block_n + c.split_k, -cands.index(c)))
    return chosen == [best], os.path.exists(os.path.join(cache_dir, "tune.json"))


def test_no_config_asks_the_autotuner(world2, tmp_path):
    got = world2.run(_tuned_in_a_world, str(tmp_path))
    assert got == [(True, True), (True, True)], got


# ------------------------------------------------------------------------------------------------ GPU only
# (K, N) of the projections: Qwen3-8B QKV / gate-up / down, LLaMA-3-8B gate-up, a TP-8 shard of Qwen3-32B
GPU_SHAPES = [(4096, 6144), (4096, 24576), (12288, 4096), (4096, 28672), (5120, 6400)]


@pytest.mark.gpu
@pytest.mark.parametrize("kn", GPU_SHAPES, ids=lambda kn: f"k{kn[0]}_n{kn[1]}")
def test_decode_gemm_bf16_on_gpu(kn):
    if DEVICE != "cuda":
        pytest.skip("a GPU test: the GPU suite runs it")
    k, n = kn
    for m in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for layout in ("t", "row"):
            _check(m, k, n, torch.bfloat16, layout, None, seed=m + k, device="cuda")


@pytest.mark.gpu
def test_decode_gemm_replays_in_a_cuda_graph():
    """Captured once (after a warm-up call on the capturing stream), replayed on new data: the split-K counters
    reset themselves, so every replay is right."""
    if DEVICE != "cuda":
        pytest.skip("a GPU test: the GPU suite runs it")
    m, k, n = 4, 12288, 4096
    a = rand((m, k), torch.bfloat16, 1, "cuda")
    b = rand((n, k), torch.bfloat16, 2, "cuda").t()
    out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
    cfg = dg.default_config(m, n, k, torch.bfloat16, gemm.core_sms(a.device))
    assert cfg.split_k > 1, "the shape exercises the split-K reduction"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dg.decode_gemm(a, b, out=out, config=cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        dg.decode_gemm(a, b, out=out, config=cfg)
    for seed in range(3):
        a.copy_(rand((m, k), torch.bfloat16, 10 + seed, "cuda"))
        poison(out)
        graph.replay()
        torch.cuda.synchronize()
        check_gemm(out, a.double() @ b.double(), torch.matmul(a, b), torch.bfloat16, f"replay {seed}")


@pytest.mark.gpu
def test_pdl_chain_waits_for_its_producer_in_a_cuda_graph():
    """Two decode GEMMs launched with programmatic dependent launch, the second reading the first's output, captured
    once and replayed on new data: the second must wait for the first (griddepcontrol.wait) every time, and both
    share the split-K scratch and counters."""
    if DEVICE != "cuda":
        pytest.skip("a GPU test: the GPU suite runs it")
    m, k, h, n = 4, 12288, 4096, 6144
    a = rand((m, k), torch.bfloat16, 1, "cuda")
    w1 = rand((h, k), torch.bfloat16, 2, "cuda") / 64
    w2 = rand((n, h), torch.bfloat16, 3, "cuda") / 32
    mid = torch.empty((m, h), dtype=torch.bfloat16, device="cuda")
    out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
    c1 = dg.default_config(m, h, k, torch.bfloat16, gemm.core_sms(a.device))
    c2 = dg.default_config(m, n, h, torch.bfloat16, gemm.core_sms(a.device))
    assert c1.split_k > 1, "the first product exercises the split-K reduction"

    def step():
        dg.decode_gemm(a, w1.t(), out=mid, config=c1, pdl=True)
        dg.decode_gemm(mid, w2.t(), out=out, config=c2, pdl=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(3):
            step()
    for seed in range(3):
        a.copy_(rand((m, k), torch.bfloat16, 10 + seed, "cuda"))
        poison(mid)
        poison(out)
        graph.replay()
        torch.cuda.synchronize()
        want_mid = dg.decode_gemm(a, w1.t(), config=c1)
        assert torch.equal(mid, want_mid), f"replay {seed}: the first product differs"
        assert torch.equal(out, dg.decode_gemm(want_mid, w2.t(), config=c2)), f"replay {seed}: the second differs"
