"""What MPS does on this machine, for the shared-GPU world (run on a GPU machine: ``python3 scripts/probe_mps.py``).

Prints, each in a fresh process: the SM count a process sees without MPS, as a client of a private MPS daemon, and
as a client capped by ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``; whether a client outside MPS can run while an MPS client
holds the GPU; and whether the daemon stops cleanly. Used to decide how ``World.num_sms`` sizes grids there.
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from triton_dist.runtime import mps  # noqa: E402

SMS = ("import torch, time; p = torch.cuda.get_device_properties(0); x = torch.randn(4096, 4096, device='cuda');"
       "torch.cuda.synchronize(); t = time.time(); [x @ x for _ in range(50)]; torch.cuda.synchronize();"
       "print(p.multi_processor_count, round((time.time() - t) * 1e3, 1), 'ms')")
HOLD = "import torch, time; x = torch.randn(1024, device='cuda'); torch.cuda.synchronize(); time.sleep(8)"


def run(label, env, code=SMS, timeout=60):
    t = time.time()
    try:
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                             text=True, timeout=timeout)
        res = (out.stdout.strip() or out.stderr.strip()[-300:])
    except subprocess.TimeoutExpired:
        res = "TIMEOUT"
    print(f"{label:<44} {res}  ({time.time() - t:.1f} s)", flush=True)


def each_setting(code, what, timeout=60, then=None, percentages=(50, 33, 25)):
    """Run ``code`` in a fresh process without MPS, as a client of a private MPS daemon, and as a client capped at
    each of ``percentages`` of the SMs (``what``: the label's end); ``then(daemon)`` runs before the daemon stops."""
    run(f"no MPS: {what}", mps.OPT_OUT_ENV, code, timeout)
    daemon = mps.PrivateMPS.start()
    try:
        run(f"MPS client: {what}", daemon.env, code, timeout)
        for pct in percentages:
            run(f"MPS client capped at {pct}%: {what}", dict(daemon.env, **{mps.ACTIVE_THREADS_ENV: str(pct)}), code,
                timeout)
        if then is not None:
            then(daemon)
    finally:
        t = time.time()
        daemon.stop()
        print(f"daemon stopped in {time.time() - t:.1f} s; processes left: {mps._daemon_pids(daemon.pipe_dir)}")


def _beside_an_mps_client(daemon):
    holder = subprocess.Popen([sys.executable, "-c", HOLD], env=dict(os.environ, **daemon.env))
    time.sleep(3)
    run("non-MPS client while an MPS client lives", mps.OPT_OUT_ENV)
    holder.wait(30)


def main():
    print("control binary:", mps.control_binary(), "| running daemon:", mps.running_pipe_dir())
    each_setting(SMS, "SMs, 50 matmuls 4096^3", then=_beside_an_mps_client)


if __name__ == "__main__":
    main()
