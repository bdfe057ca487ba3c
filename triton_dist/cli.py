"""The ``triton-dist`` command (also ``python -m triton_dist``).

::

    triton-dist run -n 4 script.py [args...]        # 4 ranks: GPUs if present, else a CPU world
    triton-dist run -n 4 --share-gpus script.py     # 4 ranks on the GPUs there are (rank r on GPU r % G)
    triton-dist run -n 2 --mode cpu -m pkg.mod      # a module, on the CPU world
    triton-dist bench primitives [-n N] [args...]   # a benchmark of triton_dist.bench (primitives,
                                                    # collectives, gemm, cores, attention, moe, e2e)
    triton-dist generate --tp N [--world cpu] --model M --mode torch,ag_rs [args...]
                                                    # prefill + decode of a model (triton_dist.models.generate);
                                                    # here --mode is the model's TP mode, --world the launcher's
    triton-dist demo [-n N]                         # the intra-node all-gather tutorial
    triton-dist mps start | stop DIR                # a private MPS daemon for shared-GPU worlds (prints exports)

The exit code is the world's: 0 when every rank succeeded, the failing rank's code, 124 on a timeout,
130 when interrupted, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import os
import sys

BENCHES = ["primitives", "collectives", "gemm", "cores", "attention", "moe", "e2e"]
GENERATE_MODULE = "triton_dist.models.generate"
DEMO_SCRIPT = os.path.join("tutorials", "02_intra_node_allgather.py")
EXIT_USAGE = 2
EXIT_CODES = """exit codes:
  0     every rank exited 0
  N     the first failing rank's exit code (128 + signal number for a rank killed by a signal)
  124   the deadline (--timeout) or the straggler deadline passed; the ranks were stopped
  130   interrupted (Ctrl-C, SIGTERM); the ranks were stopped
  2     usage error (nothing was started)"""


def _nprocs(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not s > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return s


def _world_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("-n", "--nprocs", type=_nprocs, default="auto",
                        help="number of ranks, or 'auto' (local GPUs; 4 in the CPU world) [default: auto]")
    common.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto",
                        help="gpu: torchrun, one rank per GPU; cpu: Triton-interpreter world; auto: gpu when "
                             "CUDA GPUs are visible (TRITON_DIST_LAUNCH_MODE overrides) [default: auto]")
    common.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="deadline: seconds the whole world may run before it is stopped with exit code 124 "
                             "[default: TRITON_DIST_RUN_TIMEOUT or 1800]")
    common.add_argument("--share-gpus", action="store_true",
                        help="GPU mode: allow more ranks than GPUs, rank r on GPU r %% G (a shared-GPU world for "
                             "development and tests; its timings are not performance)")
    common.add_argument("--no-mps", action="store_true",
                        help="with --share-gpus: start no MPS daemon and keep the ranks off any; they time-slice "
                             "the GPU (correct, slow)")
    return common


def _generate_world_options() -> argparse.ArgumentParser:
    """The launcher's options of ``generate``: ``--tp`` (or ``-n``) ranks and ``--world`` for what ``--mode`` is
    elsewhere, because there ``--mode`` is the model's tensor-parallel mode (passed on, like every other option)."""
    opts = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    opts.add_argument("--tp", "-n", dest="nprocs", type=_nprocs, default="auto",
                      help="ranks, the tensor-parallel degree, or 'auto' (local GPUs; 4 in the CPU world) "
                           "[default: auto]")
    opts.add_argument("--world", dest="mode", choices=("auto", "gpu", "cpu"), default="auto",
                      help="gpu: torchrun, one rank per GPU; cpu: Triton-interpreter world; auto: gpu when CUDA GPUs "
                           "are visible (run's --mode) [default: auto]")
    opts.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                      help="seconds the whole world may run before it is stopped with exit code 124")
    opts.add_argument("--share-gpus", action="store_true", help="allow more ranks than GPUs (as for run)")
    opts.add_argument("--no-mps", action="store_true", help="with --share-gpus: no MPS daemon (as for run)")
    return opts


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``triton-dist``."""
    common = _world_options()
    parser = argparse.ArgumentParser(prog="triton-dist", description="Launch and try triton-dist worlds.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,bench,generate,demo,mps}")

    run = sub.add_parser("run", parents=[common], allow_abbrev=False,
                         help="run a script or module on every rank",
                         description="Run a script (or with -m a module) on N ranks; arguments after it are "
                                     "passed through untouched.",
                         epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("-m", dest="module", action="store_true", help="the target is a module name, as in python -m")
    run.add_argument("target", help="script path, or module name with -m")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")

    bench = sub.add_parser("bench", parents=[common], allow_abbrev=False,
                           help="run a benchmark of triton_dist.bench",
                           description="Run benchmark module triton_dist.bench.NAME on N ranks; unrecognised "
                                       "arguments (or all after '--') go to the benchmark.",
                           epilog="A benchmark's own options: python -m triton_dist.bench.NAME --help (no world "
                                  "needed).\n\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("name", choices=BENCHES, help="benchmark name")

    sub.add_parser("generate", parents=[_generate_world_options()], allow_abbrev=False,
                   help="prefill and decode a model in one or more TP modes, timed",
                   description="Run triton_dist.models.generate on --tp ranks: build the model (preset shapes with "
                               "random weights, or a checkpoint directory), prefill and decode in each --mode, and "
                               "print a table of prefill / step times, tokens/s and whether the modes' tokens agree. "
                               "Unrecognised options go to it; note that --mode here is the model's mode (torch, "
                               "ag_rs, allreduce, gemm_ar, a comma list or all) and --world the launcher's.",
                   epilog="Its options: python -m triton_dist.models.generate --help (no world needed): --model "
                          "DIR|PRESET [--random-weights] [--mode M[,M2...]|all] [--batch B] [--prompt-len P] "
                          "[--gen-len G] [--prompt TEXT] [--dtype bf16|fp16|fp32] [--page-size N] [--no-graphs] "
                          "[--sampling greedy|top_p] [--top-p F] [--temperature T] [--seed S] [--layers L] "
                          "[--warmup N] [--stop-at-eos].\n\n" + EXIT_CODES,
                   formatter_class=argparse.RawDescriptionHelpFormatter)

    sub.add_parser("demo", parents=[common], allow_abbrev=False,
                   help=f"run {DEMO_SCRIPT} (the intra-node all-gather tutorial)",
                   description=f"Run {DEMO_SCRIPT} on N ranks: an all-gather built from the device primitives, "
                               "checked exactly against torch.distributed's all_gather ('match: yes') and, on GPUs "
                               "with one GPU per rank, timed against NCCL.",
                   epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)

    daemon = sub.add_parser("mps", allow_abbrev=False, help="start or stop a private MPS daemon",
                            description="start: start an MPS control daemon with its own pipe and log directories "
                                        "and print shell export lines for its clients (eval them); stop DIR: stop "
                                        "the daemon whose directory start printed as TRITON_DIST_MPS_ROOT.")
    daemon.add_argument("action", choices=("start", "stop"))
    daemon.add_argument("root", nargs="?", help="stop: the TRITON_DIST_MPS_ROOT that start printed")
    return parser


def repo_root() -> str:
    """The directory holding the ``triton_dist`` package (the repository root in a source checkout)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``triton-dist``: parse ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, extra = parser.parse_known_args(argv)
    if extra and opts.command not in ("bench", "generate"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    extra = [a for a in extra if a != "--"]  # '--' only separates; argparse may leave it anywhere in extra

    if opts.command == "mps":
        from .runtime import mps
        if (opts.root is None) != (opts.action == "start"):
            parser.error("usage: triton-dist mps start | triton-dist mps stop DIR")
        try:
            return mps.main([opts.action] + ([opts.root] if opts.root else []))
        except RuntimeError as err:
            print(f"triton-dist: error: {err}", file=sys.stderr)
            return 1

    module = False
    if opts.command == "run":
        target, args, module = opts.target, opts.args, opts.module
    elif opts.command == "bench":
        target, args, module = f"triton_dist.bench.{opts.name}", extra, True
    elif opts.command == "generate":
        target, args, module = GENERATE_MODULE, extra, True
    else:
        target, args = os.path.join(repo_root(), DEMO_SCRIPT), []
        if not os.path.isfile(target):
            print(f"triton-dist: error: the demo script {target} is missing; `triton-dist demo` needs a source "
                  "checkout of triton-dist (the tutorials/ directory is not part of the installed package)",
                  file=sys.stderr)
            return EXIT_USAGE

    from .runtime.launcher import EXIT_INTERRUPTED, launch
    try:
        return launch(opts.nprocs, target, args, module=module, mode=opts.mode, timeout=opts.timeout,
                      share_gpus=opts.share_gpus, mps=not opts.no_mps)
    except ValueError as err:
        print(f"triton-dist: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
