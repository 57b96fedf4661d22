#!/usr/bin/env bash
# Run bench.compare on the lent GPU as one detached process that outlives a 10-minute device call,
# and collect its results from the next calls (the machine stays held while calls follow each other).
#   bash bench/device_run.sh start "--workload wan-1.3b-33f --schedule static;--workload wan-1.3b-1f"
#   bash bench/device_run.sh exec "torchrun --nproc-per-node 2 -m bench.context_parallel --workload wan-1.3b-1f"
#                                          # any commands, as given; --out $RESULTS keeps their files
#   bash bench/device_run.sh wait 560      # repeat until it prints "done"; packs the results into $OUT/results.tgz
#                                          # (one file: $OUT brings back 8 at most; no .png or .prof) beside bench.log;
#                                          # here: tar xzf /work/.device/N/results.tgz -C DIR
# A run's own --out (a folder under /tmp/stepcache-bench/results) keeps two runs of one workload apart.
set -u
dir=/tmp/stepcache-bench
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}  # wheels carried in .whl, installed to /tmp/site
case "$1" in
  start|exec)
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "a run is still going (pid $(cat "$dir/pid")): wait for it; two runs at once spoil each other's timings"; exit 1
    fi
    mkdir -p "$dir/results" && rm -f "$dir/done"
    prefix=$([ "$1" = start ] && echo "python3 -m bench.compare --out $dir/results")
    export RESULTS=$dir/results
    setsid nohup bash -c 'IFS=";"; for run in $1; do eval "$3 $run"; done; touch $2/done' \
      _ "$2" "$dir" "$prefix" > "$dir/log" 2>&1 < /dev/null &
    echo $! > "$dir/pid"
    echo "started: $2" ;;
  wait)
    end=$((SECONDS + $2))
    while [ ! -f "$dir/done" ] && [ $SECONDS -lt $end ]; do sleep 5; done
    grep -av "call/s\|it/s\]" "$dir/log" | grep -E "^\||INFO (rank0 )?bench|ERROR|wrote|Traceback|[Ww]atchdog" | tail -n 60
    tar czf "${OUT:?}/results.tgz" -C "$dir" --exclude='*.png' --exclude='*.prof' results; cp "$dir/log" "$OUT/bench.log"
    if [ -f "$dir/done" ]; then echo done; else echo running; fi ;;
esac
