"""What ``torchrun`` starts on each GPU rank of ``triton-dist run``: the user's script or module, with its
arguments passed through the environment (``TRITON_DIST_TARGET``), so torchrun never parses them."""
import json
import os
import runpy
import sys

ENV = "TRITON_DIST_TARGET"


def main() -> None:
    spec = json.loads(os.environ[ENV])
    sys.argv = [spec["target"], *spec["args"]]
    if spec["module"]:
        runpy.run_module(spec["target"], run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(spec["target"])))
        runpy.run_path(spec["target"], run_name="__main__")


if __name__ == "__main__":
    main()
