"""Every GPU kernel compiles for sm_90 on this CPU machine (Triton's own ptxas), so what the interpreter accepts but
the compiler rejects fails CI instead of a GPU run."""
import os
import subprocess
import sys
from pathlib import Path

from triton_dist.language import _shmem_names

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm90(tmp_path):
    """The script's two parts (its own list, the per-family lists) side by side: two compiler processes."""
    procs = []
    for part in ("main", "families"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=str(tmp_path / f"cache_{part}"), PYTHONPATH=str(ROOT),
                   TRITON_DIST_COMPILE_PART=part)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "scripts" / "compile_gpu_kernels.py")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0 and "0 failed" in stdout, stdout[-4000:] + stderr[-4000:]
    stdout = outs[0][0] + outs[1][0]  # the two parts' output, read as one
    assert stdout.count("\nok ") + stdout.startswith("ok ") >= 118, stdout
    # the cuda backend's libshmem_device (triton_dist_shmem.ll) linked every NVSHMEM name down to a cubin
    assert stdout.count("(triton_dist_shmem.ll)\n") >= 7, stdout
    n = len(_shmem_names.ALL)
    assert f"names linked with triton_dist_shmem.ll: {n} of {n}" in stdout, stdout
