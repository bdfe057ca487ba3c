"""Helper of the launcher test scripts: record pids in ``$TRITON_DIST_TEST_PID_DIR`` for the orphan check."""
import os


def record(pid: int | None = None, tag: str = "") -> None:
    """Write ``pid`` (default: this process) to ``rank<R><tag>.pid`` in the pid directory, if one is given."""
    folder = os.environ.get("TRITON_DIST_TEST_PID_DIR")
    if not folder:
        return
    path = os.path.join(folder, f"rank{os.environ.get('RANK', 'x')}{tag}.pid")
    with open(path + ".tmp", "w") as f:
        f.write(str(pid or os.getpid()))
    os.replace(path + ".tmp", path)  # the test never reads a half-written file
