"""Run as a module (``triton-dist run -m echo_rank a b``): prints what a rank sees, without joining a world."""
import os
import sys

if __name__ == "__main__":
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET", "TRITON_DIST_BACKEND")
    seen = " ".join(f"{k}={os.environ.get(k)}" for k in keys)
    os.write(1, f"module rank {os.environ['RANK']}: {seen} args={sys.argv[1:]}\n".encode())
