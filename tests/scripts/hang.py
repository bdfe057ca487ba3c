"""Every rank starts a helper process in its own process group, joins the world, then sleeps forever."""
import subprocess
import sys
import time

import _pids

_pids.record()
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
_pids.record(helper.pid, "_helper")

import triton_dist  # noqa: E402

triton_dist.init()
while True:
    time.sleep(3600)
