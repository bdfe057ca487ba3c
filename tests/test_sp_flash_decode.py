"""Distributed flash-decode (``ops.sp_flash_decode``) on the CPU world: every rank's result equals attention over
the concatenation of all ranks' keys (torch, fp32), and the torch.distributed reference; uneven and empty shards,
paged and contiguous caches, GQA, lse."""
import pytest
import torch
import torch.distributed as dist

from triton_dist import ops
from triton_dist.kernels.attention._common import attention_rows_reference

from _util import poison, rand, this_world


def _shard(b, t, hkv, d, dtype, seed, rank, w, device):
    """This rank's KV shard: [B, T, Hkv, D] with rank-dependent lengths (sequence 0 empty on rank 0, sequence 1
    empty on every rank), and the same sequence's lengths on every rank."""
    k = rand((b, t, hkv, d), dtype, seed + 10 * rank + 1, device)
    v = rand((b, t, hkv, d), dtype, seed + 10 * rank + 2, device)
    g = torch.Generator().manual_seed(seed + rank)
    lens = torch.randint(1, t + 1, (b,), generator=g, dtype=torch.int32)
    if rank == 0:
        lens[0] = 0
    if b > 1:
        lens[1] = 0
    return k, v, lens.to(device)


def _concat_truth(q, k, v, lens, scale):
    """fp32 attention over every rank's keys of each sequence, in rank order."""
    world = this_world()
    n = world.world_size
    ks, vs, ls = ([torch.empty_like(x) for _ in range(n)] for x in (k, v, lens))
    for parts, x in ((ks, k), (vs, v), (ls, lens)):
        dist.all_gather(parts, x.contiguous(), group=world.group)
    outs, lses = [], []
    for b in range(q.shape[0]):
        kb = torch.cat([ks[r][b, :int(ls[r][b])] for r in range(n)])
        vb = torch.cat([vs[r][b, :int(ls[r][b])] for r in range(n)])
        o, lse = attention_rows_reference(q[b:b + 1], kb, vb, scale=scale)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


def _body(b, hq, hkv, d, t, dtype, page, seed):
    w = this_world()
    q = rand((b, hq, d), dtype, seed, w.device)  # the same query on every rank
    k, v, lens = _shard(b, t, hkv, d, dtype, seed, w.rank, w.world_size, w.device)
    table = None
    kc, vc = k, v
    if page:  # the same cache as pages in a shuffled order
        per = t // page
        perm = torch.randperm(b * per, generator=torch.Generator().manual_seed(seed + w.rank)).to(torch.int32)
        kc = torch.empty((b * per, page, hkv, d), dtype=dtype, device=w.device)
        vc = torch.empty_like(kc)
        kc[perm.long()] = k.reshape(b * per, page, hkv, d)
        vc[perm.long()] = v.reshape(b * per, page, hkv, d)
        table = perm.view(b, per).to(w.device)
    scale = d ** -0.5
    out = poison(torch.empty_like(q))
    got, lse = ops.sp_flash_decode(q, kc, vc, lens, block_table=table, return_lse=True, out=out)
    truth, truth_lse = _concat_truth(q, k, v, lens, scale)
    ref, ref_lse = ops.sp_flash_decode_reference(q, kc, vc, lens, block_table=table)
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    ok = got is out and torch.allclose(got.float(), truth, atol=tol, rtol=tol)
    ok &= torch.allclose(ref, truth, atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(truth_lse)
    ok &= torch.equal(fin, torch.isfinite(lse)) and torch.allclose(lse[fin], truth_lse[fin], atol=1e-4, rtol=1e-4)
    again = ops.sp_flash_decode(q, kc, vc, lens, block_table=table)  # same bits on the second call
    ok &= torch.equal(again, got)
    # every rank holds the same result
    every = [torch.empty_like(got) for _ in range(w.world_size)]
    dist.all_gather(every, got, group=w.group)
    ok &= all(torch.equal(x, got) for x in every)
    return bool(ok)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("page", [0, 4], ids=["contiguous", "paged4"])
def test_sp_flash_decode_matches_concatenated_kv(world, heads, page, seed):
    assert all(world.run(_body, 3, *heads, 64, 40, torch.float32, page, seed))


def test_sp_flash_decode_fp16_and_bf16(world2, seed):
    for dtype in (torch.float16, torch.bfloat16):
        assert all(world2.run(_body, 2, 8, 2, 64, 24, dtype, 1, seed))


def _one_rank(seed):
    """At one rank the op is the local decode: the same bits as ``flash_decode``, lse included."""
    from triton_dist.kernels.attention import flash_decode as fd
    w = this_world()
    q = rand((3, 8, 64), torch.float32, seed, w.device)
    k, v, lens = _shard(3, 40, 2, 64, torch.float32, seed, w.rank, w.world_size, w.device)
    got, lse = ops.sp_flash_decode(q, k, v, lens, return_lse=True)
    want, want_lse = fd.flash_decode(q, k, v, lens, return_lse=True)
    return torch.equal(got, want) and torch.equal(lse, want_lse)


def test_one_rank_is_the_local_decode(world1, seed):
    assert all(world1.run(_body, 3, 8, 2, 64, 40, torch.float32, 0, seed))
    assert all(world1.run(_one_rank, seed))


def _bad(case):
    dev = this_world().device
    q = torch.ones((2, 4, 64), device=dev)
    kv = torch.ones((2, 8, 2, 64), device=dev)
    lens = torch.full((2,), 8, dtype=torch.int32, device=dev)
    calls = {
        "q_dims": lambda: ops.sp_flash_decode(q[0], kv, kv, lens),
        "q_type": lambda: ops.sp_flash_decode(q.tolist(), kv, kv, lens),
        "heads": lambda: ops.sp_flash_decode(torch.ones((2, 3, 64), device=dev), kv, kv, lens),
        "lens_dtype": lambda: ops.sp_flash_decode(q, kv, kv, lens.long()),
    }
    try:
        calls[case]()
    except (ValueError, TypeError) as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,needle", [("q_dims", "q must have 3 dims"), ("q_type", "q must be a torch.Tensor"),
                                         ("heads", "multiple of the kv heads"), ("lens_dtype", "int32")])
def test_bad_input(world2, case, needle):
    for msg in world2.run(_bad, case):
        assert needle in msg, msg
