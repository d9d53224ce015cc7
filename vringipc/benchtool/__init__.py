"""The benchmark tool behind ``vringipc bench`` and the segment tools behind
``vringipc ls / inspect / gc`` (docs/BENCH.md).

transports  adapters (one small class per transport) and their registry
procs       forked benchmark processes: control channel, pinning, watchdog
latency     ping-pong round trips, HDR histograms, fixed-rate mode
throughput  N producers x M consumers, single and batch APIs, CPU per message
oversub     P ping-pong pairs at once, unpinned: round trips/s under oversubscription
compare     a session: cases, measurement, tables, JSON, .hgrm, plots
report      the verdict, tables, runs that disagree, progress line, JSON document
            and its documented fields
plots       matplotlib PNGs (optional)
machine     CPU, kernel, Python, package versions, build, machine load
segments    /dev/shm segments: ls, inspect, gc
"""
