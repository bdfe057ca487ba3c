"""Probe (one process, all local GPUs): is 'gather by copy engine + one cuBLAS matmul per chunk' as fast as the
GEMM alone? Times on cuda:0: full mm; world chunk mms; chunk mms while the other chunks are copied from the peers
on side streams (one stream per peer, or one stream for all), waiting per chunk on events."""
import statistics
import torch

W = torch.cuda.device_count()
dev = torch.device("cuda:0")


def med(fn, iters=15):
    ts = []
    for _ in range(3):
        fn()
    for _ in range(iters):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        torch.cuda.synchronize()
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1000)
    return statistics.median(ts)


def probe_ag(M, K, N):
    m = M // W
    a_loc = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
    peers = [torch.randn(m, K, device=f"cuda:{p}", dtype=torch.bfloat16) for p in range(W)]
    gathered = torch.empty(M, K, device=dev, dtype=torch.bfloat16)
    b = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
    out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    streams = [torch.cuda.Stream(dev) for _ in range(W)]
    evs = [torch.cuda.Event() for _ in range(W)]
    main = torch.cuda.current_stream(dev)

    def full():
        torch.mm(gathered, b, out=out)

    def chunks():
        for c in range(W):
            torch.mm(gathered[c * m:(c + 1) * m], b, out=out[c * m:(c + 1) * m])

    def overlapped(parallel):
        fork = torch.cuda.Event()
        fork.record(main)
        for i in range(1, W):
            st = streams[i if parallel else 1]
            st.wait_event(fork)
            with torch.cuda.stream(st):
                gathered[i * m:(i + 1) * m].copy_(peers[i], non_blocking=True)
                evs[i].record(st)
        torch.mm(a_loc, b, out=out[:m])
        for i in range(1, W):
            main.wait_event(evs[i])
            torch.mm(gathered[i * m:(i + 1) * m], b, out=out[i * m:(i + 1) * m])

    def copies(parallel):
        fork = torch.cuda.Event()
        fork.record(main)
        for i in range(1, W):
            st = streams[i if parallel else 1]
            st.wait_event(fork)
            with torch.cuda.stream(st):
                gathered[i * m:(i + 1) * m].copy_(peers[i], non_blocking=True)
                evs[i].record(st)
        for i in range(1, W):
            main.wait_event(evs[i])

    r = dict(full=med(full), chunks=med(chunks), copies_1stream=med(lambda: copies(False)),
             copies_par=med(lambda: copies(True)), ovl_1stream=med(lambda: overlapped(False)),
             ovl_par=med(lambda: overlapped(True)))
    print(f"AG M={M} K={K} N={N}: " + "  ".join(f"{k} {v:.0f}" for k, v in r.items()), flush=True)


def probe_rs(M, K, N):
    m = M // W
    a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    b = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
    out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    recv = [torch.empty(m, N, device=f"cuda:{p}", dtype=torch.bfloat16) for p in range(W)]
    slots = torch.empty(W, m, N, device=dev, dtype=torch.bfloat16)
    res = torch.empty(m, N, device=dev, dtype=torch.bfloat16)
    streams = [torch.cuda.Stream(dev) for _ in range(W)]
    evs = [torch.cuda.Event() for _ in range(W)]
    main = torch.cuda.current_stream(dev)

    def full():
        torch.mm(a, b, out=out)

    def overlapped(parallel):
        for i in range(1, W):
            torch.mm(a[i * m:(i + 1) * m], b, out=out[i * m:(i + 1) * m])
            evs[i].record(main)
            st = streams[i if parallel else 1]
            st.wait_event(evs[i])
            with torch.cuda.stream(st):
                recv[i].copy_(out[i * m:(i + 1) * m], non_blocking=True)
        torch.mm(a[:m], b, out=slots[0])
        for i in range(1, W):
            main.wait_stream(streams[i if parallel else 1])
        torch.sum(slots, dim=0, out=res)

    def reduce_only():
        torch.sum(slots, dim=0, out=res)

    r = dict(full=med(full), reduce=med(reduce_only), ovl_1stream=med(lambda: overlapped(False)),
             ovl_par=med(lambda: overlapped(True)))
    print(f"RS M={M} K={K} N={N}: " + "  ".join(f"{k} {v:.0f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(0), "GPUs", W)
    for M, K, N in [(8192, 8192, 7168), (4096, 8192, 2048), (4096, 4096, 3584), (2048, 8192, 7168),
                    (8192, 4096, 3584)]:
        probe_ag(M, K, N)
    for M, K, N in [(8192, 7168, 8192), (4096, 7168, 8192), (2048, 3584, 4096), (1024, 7168, 8192)]:
        probe_rs(M, K, N)
