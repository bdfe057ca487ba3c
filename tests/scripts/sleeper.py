"""Every rank starts a helper process in its own process group and sleeps forever (no world: starts fast)."""
import subprocess
import sys
import time

import _pids

helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
_pids.record(helper.pid, "_helper")
_pids.record()  # written last: once every rank's file exists, every helper runs
while True:
    time.sleep(3600)
