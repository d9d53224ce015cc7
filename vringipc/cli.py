"""The ``vringipc`` command (also ``python -m vringipc``)."""

from __future__ import annotations

import argparse
import json
import sys

_BENCH_EPILOG = """\
Every figure is measured in forked processes (pinned as --pin says), after a
warm-up, --runs times, the runs of all cases interleaved in rounds so that a
change in machine load hits every transport alike; tables and plots show the
median over runs of each run's figure and [min-max] over runs, and name every
figure whose runs disagree by more than 2x.  Results go to --out DIR: <mode>.json (machine, settings,
every figure, HDR histograms), hgrm/*.hgrm percentile files, and PNG plots
when matplotlib is installed (pip install 'vringipc[bench]').
Wait policies: spin = busy-poll, never sleep; block = sleep in the kernel until
woken; adaptive = spin ~50 us, then sleep; default = each transport's own
(vringipc: the library's default wait; the others: a blocking get/recv).  A transport is measured only with
the policies it supports (see `vringipc bench list`).
Sizes: "64,4K,1M", or a range "8..16M" (x8 steps) / "8..16M:x4".
"""


def _quick_s() -> int:
    from vringipc.benchtool.compare import QUICK_SECONDS
    return QUICK_SECONDS


def _add_oversub(p: argparse.ArgumentParser, compare: bool = False) -> None:
    g = p.add_argument_group("oversubscription")
    g.add_argument("--pairs", metavar="LIST",
                   help="numbers of ping-pong pairs run at once (default 1,2,4,8,16; "
                        "compare --quick: 1,4,16)")
    if compare:
        g.add_argument("--os-duration", type=float, metavar="S",
                       help="seconds counted per oversubscription run")
        g.add_argument("--no-oversub", action="store_true",
                       help="leave out the oversubscription sweep")


def _add_common(p: argparse.ArgumentParser, *, compare: bool = False) -> None:
    g = p.add_argument_group("what to run")
    g.add_argument("-t", "--transport", action="append", metavar="NAME",
                   help="transport(s) to measure, comma-separated or repeated; 'all' = every "
                        "registered one (default: vringipc.Channel; compare: all)")
    g.add_argument("--payload", dest="payloads", metavar="SIZES",
                   help="payload sizes in bytes" + (" for the latency part" if compare else ""))
    g.add_argument("--policy", dest="policies", metavar="LIST",
                   help="wait policies: spin,block,adaptive")
    g.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import a module or .py file that registers extra transport adapters "
                        "(see docs/BENCH.md)")
    g = p.add_argument_group("measurement")
    g.add_argument("--quick", action="store_true",
                   help="fewer sizes, shorter runs (compare --quick: about %d s)" % _quick_s())
    if compare:
        g.add_argument("--time", type=float, metavar="S",
                       help="with --quick: scale the runs to take about S seconds in all "
                            "(default %d)" % _quick_s())
    g.add_argument("--runs", type=int, metavar="N", help="runs per figure (fresh processes each)")
    g.add_argument("--duration", type=float, metavar="S", help="seconds measured per run")
    g.add_argument("--warmup", type=float, metavar="S", help="seconds of warm-up per run")
    g.add_argument("--max-samples", type=int, default=500_000, metavar="N",
                   help="round trips recorded per run at most (default 500000)")
    g.add_argument("--pin", metavar="LIST",
                   help="CPU pinning, one or more of: split = the processes on different CPUs, "
                        "same = all on one CPU, none = let the scheduler place them, auto = "
                        "split for the spin and adaptive policies (a spinner needs its own CPU), "
                        "none for block (a woken process is fastest where its waker runs). "
                        "Latency cases run once per pinning given. Default: auto; compare: "
                        "none,split,same (--quick: none,same), throughput part unpinned")
    g.add_argument("--cpus", metavar="LIST", help="CPUs to pin to, e.g. 2,3 (default: this "
                                                 "process's affinity)")
    g.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="give up on a run after this many seconds (default 120)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="vringipc-bench-results", metavar="DIR",
                   help="directory for JSON, .hgrm and plots (default ./vringipc-bench-results); "
                        "'' = write nothing")
    g.add_argument("--json", metavar="PATH", help="JSON path (default DIR/<mode>.json)")
    g.add_argument("--hgrm-dir", metavar="DIR", help="where .hgrm files go (default DIR/hgrm)")
    g.add_argument("--plot-dir", metavar="DIR", help="where plots go (default DIR)")
    g.add_argument("--no-hgrm", action="store_true", help="do not write .hgrm files")
    g.add_argument("--no-plots", action="store_true", help="do not draw plots")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")


def _add_throughput(p: argparse.ArgumentParser, compare: bool = False) -> None:
    g = p.add_argument_group("throughput")
    if compare:
        g.add_argument("--tp-payload", dest="tp_payloads", metavar="SIZES",
                       help="payload sizes for the throughput part")
        g.add_argument("--tp-policy", dest="tp_policies", metavar="LIST",
                       help="wait policies for the throughput part (default block; a transport "
                            "without it runs with its own, e.g. iceoryx2 spin)")
        g.add_argument("--tp-duration", type=float, metavar="S",
                       help="seconds measured per throughput run")
    g.add_argument("--api", dest="apis", metavar="LIST",
                   help="single (send/recv) and/or batch (send_many/recv_many where the "
                        "transport has it); default single,batch")
    g.add_argument("--batch", type=int, default=64, metavar="N",
                   help="messages per batch call (default 64; fewer for large payloads)")
    g.add_argument("--topology", metavar="NxM[,...]",
                   help="N producer x M consumer processes, e.g. 1x1,2x2 (default 1x1); "
                        "SPSC transports need N == M and run N links")


def version() -> str:
    """The installed distribution's version; from a source tree without an
    install, the package's own __version__."""
    from importlib import metadata
    try:
        return metadata.version("vringipc")
    except metadata.PackageNotFoundError:
        import vringipc
        return vringipc.__version__


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vringipc",
        description="vringipc: inter-process messaging over a virtio split ring in shared memory.")
    p.add_argument("--version", action="version", version=f"vringipc {version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    b = sub.add_parser(
        "bench", help="latency and throughput benchmarks against other transports",
        description="Benchmarks: round-trip latency, throughput, and a comparison with the "
                    "transports people use (multiprocessing, pipes, sockets, faster-fifo, pyzmq, "
                    "iceoryx2). Start with: vringipc bench compare --quick",
        epilog=_BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bs = b.add_subparsers(dest="bench_cmd", metavar="MODE")
    lat = bs.add_parser(
        "latency", help="ping-pong round trip between two processes: percentiles from an HDR "
                        "histogram over a payload sweep",
        description="Round-trip latency: process A sends a payload, process B sends it back; "
                    "perf_counter_ns around each round trip; p50/p90/p99/p99.9/p99.99/max from "
                    "an HDR histogram. Default: vringipc.Channel, payloads 8 B..16 MiB, spin, "
                    "block and adaptive waits.",
        epilog=_BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(lat)
    lat.add_argument("--rate", type=float, metavar="R",
                     help="fixed-rate mode: start a round trip every 1/R s and correct the "
                          "histogram for coordinated omission (record_corrected_value)")
    tp = bs.add_parser(
        "throughput", help="N producers x M consumers: messages/s, bytes/s and CPU time per "
                           "message, single and batch APIs",
        description="Throughput: producers send as fast as the transport takes messages for "
                    "--duration seconds after a warm-up; consumers count what arrives. Reports "
                    "messages/s, bytes/s and the CPU time of all processes per message.",
        epilog=_BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(tp)
    _add_throughput(tp)
    cmp_ = bs.add_parser(
        "compare", help="the latency and throughput workloads over vringipc and the other "
                        "transports, with ratios measured in the same run",
        description="Runs the ping-pong and throughput workloads over vringipc.Channel, "
                    "vringipc.Queue, multiprocessing.Queue, SimpleQueue, Pipe, os.pipe, a Unix "
                    "socketpair, and faster-fifo, pyzmq and iceoryx2 when importable (skipped "
                    "with a note otherwise), plus the oversubscription sweep. Leads with a "
                    "verdict: vringipc.Queue and vringipc.Channel as ratios to each of the "
                    "others. --quick: about %d s." % _quick_s(),
        epilog=_BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(cmp_, compare=True)
    _add_throughput(cmp_, compare=True)
    _add_oversub(cmp_, compare=True)
    osb = bs.add_parser(
        "oversub", help="P ping-pong pairs (2P processes) at once, unpinned: round trips/s "
                        "summed over the pairs, P = 1..16",
        description="Oversubscription sweep: P request/response pairs run at the same time, "
                    "unpinned, each with a request and a response link, 64 B messages; round "
                    "trips/s summed over all pairs for P = 1, 2, 4, 8, 16. Default transports: "
                    "vringipc.Queue, vringipc.Channel, mp.Queue, mp.SimpleQueue; default "
                    "policy: each transport's own.",
        epilog=_BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(osb)
    _add_oversub(osb)
    bs.add_parser("list", help="the registered transport adapters and whether they can run here")

    from vringipc.bridge import add_cli as _add_bridge
    _add_bridge(sub)
    ls = sub.add_parser("ls", help="list vringipc shared-memory segments in /dev/shm (creator, "
                                   "producer/consumer liveness, size, ring state)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ins = sub.add_parser("inspect", help="everything about one segment: header, rings, "
                                         "liveness blocks, processes using it")
    ins.add_argument("name", help="segment name, e.g. /vr_1a2b_0123456789ab")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    gc = sub.add_parser("gc", help="remove segments whose creator is dead and that no live "
                                   "process is attached to")
    gc.add_argument("names", nargs="*", metavar="NAME", help="only these segments (default: all)")
    gc.add_argument("-n", "--dry-run", action="store_true", help="only say what would be removed")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    p._bench_parser = b  # type: ignore[attr-defined]
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.cmd == "bench":
        if args.bench_cmd is None:
            parser._bench_parser.print_help()
            return 2
        if args.bench_cmd == "list":
            from vringipc.benchtool import compare
            return compare.describe_transports()
        try:
            from vringipc.benchtool import compare
        except ImportError as e:      # numpy / hdrhistogram missing
            print(f"vringipc bench needs the benchmark extras: pip install 'vringipc[bench]' ({e})",
                  file=sys.stderr)
            return 2
        try:
            import hdrh  # noqa: F401
        except ImportError:
            print("vringipc bench needs the hdrhistogram package: pip install 'vringipc[bench]' "
                  "(or pip install hdrhistogram)", file=sys.stderr)
            return 2
        try:
            return compare.run(args.bench_cmd, args, argv)
        except ValueError as e:
            parser.exit(2, f"vringipc bench: {e}\n")
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
    if args.cmd == "bridge":
        from vringipc.bridge import cli_main
        return cli_main(args)
    if args.cmd in ("ls", "inspect", "gc"):
        from vringipc.benchtool import segments as S
        if args.cmd == "ls":
            infos = S.scan()
            print(json.dumps(infos, indent=1) if args.json else S.ls_table(infos))
            return 0
        if args.cmd == "inspect":
            try:
                info = S.inspect(args.name)
            except FileNotFoundError:
                print(f"no segment {args.name} in {S.SHM_DIR}", file=sys.stderr)
                return 1
            info["live_users"] = S._live_users(info)
            print(json.dumps(info, indent=1) if args.json else S.inspect_text(info))
            return 0
        res = S.gc(dry_run=args.dry_run, names=args.names or None)
        if args.json:
            print(json.dumps(res, indent=1))
        else:
            for r in res:
                verb = ("would remove" if args.dry_run else "removed") if r["remove"] else "kept"
                if r["remove"] and not args.dry_run and not r["removed"]:
                    verb = "FAILED to remove"
                print(f"{verb:<16} {r['name']:<24} {r['reason']}")
            n = sum(1 for r in res if r["remove"])
            print(f"{n} of {len(res)} segment(s) {'to remove' if args.dry_run else 'removed'}"
                  if res else "no vringipc segments")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
