#!/usr/bin/env bash
# The GPU checks, as one prepared command for a short device window: it ends within TOTAL_S
# seconds (default 540, under the device tool's 600 s per command), whatever the settings.
#
# Run from the repository root on the GPU machine:
#     OUT=/some/folder benchmarks/gpu_check.sh
# Steps, most valuable first; each one's failure or time-out is reported in the log and the
# next step still runs, and the exit status is then 1 (a reproduce stopped at its time limit,
# as planned, is no failure). Without torch and brainprop, or a writable $OUT, nothing runs:
#   1. The CUDA graph's own tests (tests/test_fastpath.py and tests/test_stacked.py -k cuda,
#      where pytest is installed): a graphed step trains as an eager one and explores afresh at
#      every replay, and a graphed stack of seeds trains as a plain one. Then, reported but
#      gating nothing: whether graphed steps made one after another leave GPU memory behind,
#      and tests/test_fusedhead.py -k cuda, whether the fused BrainProp head gives the unfused
#      head's choices and gradient on CUDA (where it does not, training falls back by itself).
#   2. brainprop bench, every preset, once per kind in BENCH_KINDS (at most BENCH_S seconds
#      each): bf16-graph (--bf16 --cuda-graph, the speed targets' setting), stack (the same with
#      --stack STACK, STACK_PRESETS only), fp32 (cuDNN convolutions in TF32, PyTorch's default)
#      and bf16 (--bf16). Each prints its Markdown table into the log and keeps bench.json (the
#      table is made from it again by brainprop.bench.markdown).
#   3. torchrun overhead: plain 'brainprop train' and 'torchrun --nproc_per_node=1 ... train'
#      (MNIST conv, seed 0), alternated, twice each (at most TRAIN_S seconds each): the whole
#      command's wall time (process start-up included, which is all that torchrun adds: a world
#      of one joins no process group) and s_per_epoch, and whether all four reach the same
#      best_val_acc.
#   4. fast path against --eager and --cuda-graph: four runs of step 3's settings side by side
#      (at most TRAIN_S seconds in all): two plain (fast path) runs, whose difference is the
#      yardstick, how much two runs of one seed differ on this GPU anyway; one with --eager and
#      one with --cuda-graph. Each epoch's validation accuracy and peak GPU memory per run,
#      which must not grow. Side by side, their seconds mean nothing; their curves do.
#   5. brainprop reproduce in the time left. With $DATA/cifar10: the CIFAR-10 deep cell (10
#      seeds, both rules side by side; not every seed finishes; the runs measured in MEASURED
#      are skipped), with --cuda-graph when GRAPH says so, in stacks of as many seeds as step 2's stacked bench says will finish in the
#      time left (single runs where none would, or where stacking did not pay).
#      Without it: 'reproduce --datasets mnist --archs conv --seeds 4 --max-epochs 3' (8 runs)
#      three ways, each into its own folder: --jobs 1, --jobs JOBS, --stack 4; wall times in
#      packing.txt. Runs still going at the deadline get SIGTERM, save their state, and
#      their histories come back; no worker outlives the step.
# It writes at most 8 files under $OUT (the device tool returns at most 8, 2 folders deep):
#     log.txt                  everything printed (its tail is also the command's output)
#     bench-{bf16-graph,stack,fp32,bf16}/bench.json            brainprop bench
#     torchrun.txt             step 3's table and comparison, then step 4's curves
#     reproduce.tgz            step 5's results folders (results/measurements/, every run's
#                              history, reports; no checkpoints) and packing.txt, for merging
#                              into this repo's results/; written after each reproduce command
#                              and again on exit, so what was measured comes back
#
# Settings, from the environment:
#     DATA          data root (default: the repo's data/, which has MNIST only)
#     TOTAL_S       seconds the whole script may take (default 540)
#     BENCH_S       most seconds for each bench (default 100)
#     BENCH_KINDS   the benches of step 2, in order (default "bf16-graph stack fp32 bf16")
#     TRAIN_S       most seconds for each train of step 3, and for step 4 (default 60)
#     JOBS          reproduce runs side by side on the GPU in the MNIST packing test (default 4)
#     STACK         seeds in the stacked bench, and most seeds in one stack in step 5 (default
#                   10, the paper's seeds per cell)
#     STACK_PRESETS presets of the stacked bench (default cifar10/deep, step 5's cell)
#     RUN_EPOCHS    epochs step 5 expects a run to take, to size its stacks (default 160: the
#                   H200's CIFAR-10 deep runs stopped at 147 to 160)
#     BF16=1        step 5's CIFAR-10 cell trains under --bf16: more seeds in the window, reported
#                   apart from the paper's fp32 (default fp32)
#     GRAPH         step 5 starts its runs with --cuda-graph on CUDA: 1 always, 0 never, auto
#                   (default) where step 1's tests of the graph (tests/test_fastpath.py) passed
#     MEASURED      measurements step 5's CIFAR-10 cell starts from: its runs measured in
#                   earlier windows are skipped (default: the repo's results/measurements; set
#                   it empty to start afresh)
#     STEPS         steps to run (default "tests bench torchrun fastpath reproduce")
#     SMOKE=1       toy sizes on the CPU, to test this script on a machine without a GPU
#
# CIFAR-10 (~180 MB, ~140 MB as .tar.xz) cannot travel with the checkout (64 MiB per call), so
# it goes up first, in pieces of at most ~47 MB (the checkout takes the rest of a call's
# 64 MiB), each in its own device call right after the previous one (a fresh machine would
# have lost the earlier pieces), into a folder outside the checkout:
#   here, once (under runs/, which git ignores, so that nothing travels unasked):
#     brainprop download cifar10 --data-dir runs/data    (or copy a cifar10/ folder you have there)
#     mkdir -p runs/upload && tar -cf - -C runs/data cifar10/cifar-10-batches-py | xz -T0 \
#         >runs/upload/cifar10.txz && split -n 3 -d runs/upload/cifar10.txz runs/upload/cifar10.txz.
#   then, for pieces 00 and 01, a device call each with carry ["runs/upload/cifar10.txz.NN"]:
#     mkdir -p /root/data/upload && cp runs/upload/cifar10.txz.NN /root/data/upload/
#   and the call that runs the checks, with carry ["runs/upload/cifar10.txz.02"], unpacks it
#   into /root/data/cifar10/cifar-10-batches-py in the background (Python's lzma: no xz needed
#   there) while steps 1 to 4 run, beside a link to the checkout's MNIST:
#     mkdir -p /root/data/upload /root/stage && cp runs/upload/cifar10.txz.02 /root/data/upload/ &&
#         ln -sfn "$PWD/data/mnist" /root/data/mnist || exit 1
#     (cat /root/data/upload/cifar10.txz.0* | python3 -c "import lzma, sys, tarfile; tarfile.open(
#         fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('/root/stage', filter='data')" &&
#         mv /root/stage/cifar10 /root/data/) &
#     DATA=/root/data BF16=1 OUT=$OUT benchmarks/gpu_check.sh
# The upload calls spend device time too: lower TOTAL_S if the session has less than it left.
set -uo pipefail # not -e: a failed step is reported, and the next one runs
START=$(date +%s)
: "${OUT:?set OUT to the folder for the results}"
# A plain file: nothing lost at the end; its tail goes to fd 3. Without it every step would
# run with nothing to show for it (bash goes on past a failed exec's redirection).
if ! mkdir -p "$OUT" || ! exec 3>&1 >"$OUT/log.txt" 2>&1; then
    echo "gpu_check: cannot write $OUT/log.txt: set OUT to a writable folder" >&2
    exit 1
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DATA=${DATA:-$PWD/data}
TOTAL_S=${TOTAL_S:-540}
BENCH_S=${BENCH_S:-100}
TRAIN_S=${TRAIN_S:-60}
STEPS=${STEPS:-tests bench torchrun fastpath reproduce}
BENCH_KINDS=${BENCH_KINDS:-bf16-graph stack fp32 bf16}
GRAPH=${GRAPH:-auto}
MEASURED=${MEASURED-$PWD/results/measurements}
PACK_S=20  # kept at the end for packaging
GRACE_S=30 # after SIGTERM, for runs to save their state before they are killed
DEADLINE=$((START + TOTAL_S - PACK_S))
WORK=$(mktemp -d)
REPRO_DIR=$WORK/reproduce

if [[ ${SMOKE:-0} == 1 ]]; then
    DEVICE=cpu
    JOBS=${JOBS:-2}
    STACK=${STACK:-2}
    BENCH=(--presets mnist/dense --steps 2 --warmup 1 --eval-images 256)
    STACK_PRESETS=${STACK_PRESETS:-cifar10/conv}
    RUN_EPOCHS=${RUN_EPOCHS:-1}
    TRAIN=(--dataset mnist --arch dense --epochs 1 --lr 0.5 --init-std 0.03)
    CELL=cifar10/conv
    CIFAR=(--datasets cifar10 --archs conv --seeds 2 --max-epochs 1)
    PACKING=(--datasets mnist --archs dense --rules brainprop --seeds 2 --max-epochs 1)
else
    DEVICE=cuda
    JOBS=${JOBS:-4}
    STACK=${STACK:-10}
    BENCH=()
    STACK_PRESETS=${STACK_PRESETS:-cifar10/deep}
    RUN_EPOCHS=${RUN_EPOCHS:-160}
    TRAIN=(--dataset mnist --arch conv --epochs 4)
    CELL=cifar10/deep
    CIFAR=(--datasets cifar10 --archs deep --seeds 10)
    PACKING=(--datasets mnist --archs conv --seeds 4 --max-epochs 3)
fi
[[ ${BF16:-0} == 1 ]] && CIFAR+=(--bf16)

left() { echo $((DEADLINE - $(date +%s))); }
now() { date +%s.%N; }
step() { echo "== [$(($(date +%s) - START)) s] $*"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }
# failed WHAT: report a step's failure; the script's exit status is then 1.
FAILURES=0
failed() {
    echo "step $*"
    FAILURES=$((FAILURES + 1))
}

# Runs a command in a session of its own until an absolute deadline (epoch seconds), then sends
# it SIGTERM and, GRACE_S later, SIGKILL to everything in its session; whatever happened, no
# process of that session outlives it (reproduce's workers leave its process group, not its
# session). Exit status: the command's, or 124 when the deadline stopped it.
cat >"$WORK/timed.py" <<'EOF'
import os, signal, subprocess, sys, time

deadline, grace, cmd = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
proc = subprocess.Popen(cmd, start_new_session=True)


def session(sid):
    pids = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
            if entry.isdigit() and int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
                pids.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return pids


def signal_all(signum):
    for pid in session(proc.pid):
        try:
            os.kill(pid, signum)
        except OSError:
            pass


try:
    status = proc.wait(timeout=max(deadline - time.time(), 1))
except subprocess.TimeoutExpired:
    print(f"timed: deadline reached, SIGTERM to {cmd[2:4]}", flush=True)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        print(f"timed: still running {grace:.0f} s later: SIGKILL", flush=True)
        signal_all(signal.SIGKILL)
        proc.wait()
    status = 124
end = time.time() + min(grace, 10)
while session(proc.pid) and time.time() < end:
    signal_all(signal.SIGTERM)
    time.sleep(1)
if session(proc.pid):
    signal_all(signal.SIGKILL)
    time.sleep(1)
sys.exit(status if status >= 0 else 128 - status)
EOF
# timed SECONDS CMD...: run CMD for at most SECONDS, and never past the deadline.
timed() {
    local until=$(($(date +%s) + $1))
    ((until > DEADLINE - GRACE_S)) && until=$((DEADLINE - GRACE_S))
    shift
    "$PY" "$WORK/timed.py" "$until" "$GRACE_S" "$@"
}

package() {
    [[ -d $REPRO_DIR ]] || return 0
    # Exit status 1 is "a file changed while it was read": harmless, the rest is archived.
    tar --warning=no-file-changed -czf "$OUT/reproduce.tgz.part" -C "$REPRO_DIR" \
        --exclude='*.pt' --exclude='.*.tmp' .
    local rc=$?
    if ((rc <= 1)); then
        mv -f "$OUT/reproduce.tgz.part" "$OUT/reproduce.tgz"
    else
        failed "packaging reproduce.tgz failed: $rc"
        rm -f "$OUT/reproduce.tgz.part"
    fi
}
finish() {
    local rc=$?
    package
    rm -rf "$WORK"
    step "done in $(($(date +%s) - START)) s; files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
    tail -c 11000 "$OUT/log.txt" >&3
    ((rc == 0 && FAILURES > 0)) && rc=1
    exit "$rc"
}
trap finish EXIT
trap 'exit 143' TERM INT HUP

step "environment ($DEVICE, TOTAL_S=$TOTAL_S, JOBS=$JOBS, DATA=$DATA)"
timed 60 "$PY" - <<'EOF' || { failed "environment failed: $?: nothing else can run"; exit 1; }
import platform, torch
import brainprop  # from the repository root: src/ is on PYTHONPATH
print("torch", torch.__version__, "python", platform.python_version(), "cpus", __import__("os").cpu_count())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
    print("matmul allow_tf32", torch.backends.cuda.matmul.allow_tf32,
          "conv fp32_precision", getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None))
EOF

# Which of step 1's test files passed: step 5 graphs its runs where the graph's own did, and
# stacks them only where the stack's did too.
PASSED=""
if wants tests; then
    step "the CUDA graph's tests"
    if "$PY" -c "import pytest" 2>/dev/null; then
        for what in fastpath stacked; do
            # 90 s: the fused head's Triton kernels compile for the graph's test too.
            if timed 90 "$PY" -m pytest -q -p no:cacheprovider "tests/test_$what.py" \
                -k "cuda and not memory" -rs; then
                PASSED+=" $what"
            else
                failed "tests, test_$what.py failed: $?"
            fi
        done
        # The fused head falls back to the unfused one by itself where it fails. Its tests
        # without CUDA (the interpreter, sm_90 code, the fallback) are CI's: 40 s on its CPU.
        timed 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_fusedhead.py -k cuda -rs \
            || failed "tests, test_fusedhead.py failed: $?"
        # A leak costs memory, not correctness: it does not keep step 5 from graphing.
        timed 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_fastpath.py \
            -k "cuda and memory" -rs || failed "tests, the graph's memory test failed: $?"
    else
        echo "step tests skipped: no pytest for $PY"
    fi
fi

if wants bench; then
    for kind in $BENCH_KINDS; do
        if [[ ! " bf16-graph stack fp32 bf16 " == *" $kind "* ]]; then
            failed "bench: no kind $kind (BENCH_KINDS takes bf16-graph, stack, fp32, bf16)"
            continue
        fi
        [[ $kind == bf16* && $DEVICE != cuda ]] && continue
        flag=("${BENCH[@]}")
        [[ $kind != fp32 && $DEVICE == cuda ]] && flag+=(--bf16)
        [[ $kind == bf16-graph || ($kind == stack && $DEVICE == cuda) ]] && flag+=(--cuda-graph)
        [[ $kind == stack ]] && flag+=(--presets "$STACK_PRESETS" --stack "$STACK")
        step "brainprop bench $kind (at most ${BENCH_S} s, $(left) s left)"
        timed "$BENCH_S" "$PY" -m brainprop bench "${flag[@]}" --device "$DEVICE" \
            --out "$OUT/bench-$kind" || failed "bench $kind failed: $?"
        rm -f "$OUT/bench-$kind/bench.md"
    done
fi

if wants torchrun; then
    step "plain train against torchrun --nproc_per_node=1, alternated, twice each"
    table=$WORK/torchrun-rows.txt
    : >"$table"
    for i in 1 2; do
        for how in plain torchrun; do
            if (($(left) < TRAIN_S / 2 + GRACE_S)); then
                echo "$how-$i skipped: $(left) s left"
                continue
            fi
            launch=("$PY" -m brainprop)
            [[ $how == torchrun ]] &&
                launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m brainprop)
            t0=$(now)
            timed "$TRAIN_S" "${launch[@]}" train "${TRAIN[@]}" --device "$DEVICE" \
                --data-dir "$DATA" --quiet --out "$WORK/runs" --name "$how-$i"
            rc=$?
            t1=$(now)
            ((rc == 0)) || failed "torchrun, run $how-$i failed: $rc"
            echo "$how-$i $t0 $t1 $rc" >>"$table"
        done
    done
    "$PY" - "$table" "$WORK/runs" "${TRAIN[*]} --device $DEVICE" >"$OUT/torchrun.txt" <<'EOF' ||
import json, sys
from pathlib import Path

table, runs, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
print(f"brainprop train {args}, seed 0: 'torchrun' is 'torchrun --standalone --nproc_per_node=1'")
print("wall_s is the whole command (process start-up, data loading, every epoch, writing)")
print(f"{'run':<12} {'wall_s':>8} {'s_per_epoch':>12} {'best_val_acc':>13} exit")
rows = {}
for line in Path(table).read_text().splitlines():
    name, t0, t1, rc = line.split()
    try:
        s = json.loads((runs / name / "summary.json").read_text())
    except (OSError, ValueError):
        s = {}
    rows[name] = (float(t1) - float(t0), s.get("s_per_epoch"), s.get("best_val_acc"))
    spe, acc = rows[name][1:]
    spe = "-" if spe is None else f"{spe:.3f}"
    acc = "-" if acc is None else f"{acc:.4f}"
    print(f"{name:<12} {rows[name][0]:8.2f} {spe:>12} {acc:>13} {rc}")


def mean(how, i):
    vals = [r[i] for n, r in rows.items() if n.startswith(how + "-") and r[i] is not None]
    return sum(vals) / len(vals) if vals else None


for i, what in ((0, "wall_s"), (1, "s_per_epoch")):
    plain, tr = mean("plain", i), mean("torchrun", i)
    if plain and tr:
        print(f"torchrun over plain, mean {what}: {tr:.3f} / {plain:.3f} = {tr / plain:.4f}")
accs = {n: r[2] for n, r in rows.items() if r[2] is not None}
for a, b in (("plain-1", "torchrun-1"), ("plain-2", "torchrun-2"), ("plain-1", "plain-2")):
    if a in accs and b in accs:
        same = "equal" if accs[a] == accs[b] else "DIFFERENT"
        print(f"best_val_acc {a} {accs[a]!r} vs {b} {accs[b]!r}: {same}")
if len(accs) == len(rows) == 4:
    print("all four best_val_acc equal:", len(set(accs.values())) == 1)
EOF
        failed "torchrun summary failed: $?"
    cat "$OUT/torchrun.txt"
fi

if wants fastpath; then
    step "fast path against --eager and --cuda-graph: four runs side by side (at most $TRAIN_S s)"
    runs=(fast-1: fast-2: eager-1:--eager)
    [[ $DEVICE == cuda ]] && runs+=(graph-1:--cuda-graph)
    pids=()
    (($(left) < TRAIN_S / 2 + GRACE_S)) && runs=() && echo "step fastpath skipped: $(left) s left"
    for run in "${runs[@]}"; do
        # ${run#*:} is empty for the plain runs: left unquoted, it adds no argument.
        # shellcheck disable=SC2086
        timed "$TRAIN_S" "$PY" -m brainprop train "${TRAIN[@]}" ${run#*:} --device "$DEVICE" \
            --data-dir "$DATA" --quiet --out "$WORK/curves" --name "${run%%:*}" &
        pids+=("$!:${run%%:*}")
    done
    for pid in "${pids[@]}"; do
        wait "${pid%%:*}" || failed "fastpath, run ${pid#*:} failed: $?"
    done
    "$PY" - "$WORK/curves" "${runs[@]%%:*}" >>"$OUT/torchrun.txt" <<'EOF' ||
import json, sys
from pathlib import Path

runs, names = Path(sys.argv[1]), sys.argv[2:]
curves, memory = {}, {}
for name in names:
    try:
        history = json.loads((runs / name / "history.json").read_text())
        curves[name] = [row["val_acc"] for row in history]
        memory[name] = [row.get("peak_memory_mib") for row in history]
    except (OSError, ValueError, KeyError):
        print(f"{name}: no history")
print()
print("validation accuracy per epoch: fast-* take the fast path (channels_last), eager-1 runs")
print("with --eager, graph-1 with --cuda-graph; all four ran side by side")
for name, accs in curves.items():
    print(f"{name:<8} " + " ".join(f"{a:.4f}" for a in accs))
for a, b in (("fast-1", "fast-2"), ("fast-1", "eager-1"), ("fast-1", "graph-1")):
    if a in curves and b in curves:
        pairs = list(zip(curves[a], curves[b]))
        gap = max((abs(x - y) for x, y in pairs), default=float("nan"))
        print(f"largest difference {a} - {b} over {len(pairs)} epochs: {gap:.4f}")
print()
print("peak device memory per epoch (MiB; flat unless something accumulates)")
for name, mib in memory.items():
    print(f"{name:<8} " + " ".join("-" if m is None else f"{m:.0f}" for m in mib))
EOF
        failed "fastpath summary failed: $?"
    cat "$OUT/torchrun.txt"
fi

# reproduce NAME JOBS SECONDS ARGS...: one reproduce command into $REPRO_DIR/NAME, for at most
# SECONDS and never past the deadline, its wall time in packing.txt; then package what there is.
reproduce() {
    local name=$1 jobs=$2 span=$3 t0 rc runs
    shift 3
    if (($(left) < GRACE_S + 20)); then
        echo "reproduce $name skipped: $(left) s left" | tee -a "$REPRO_DIR/packing.txt"
        return
    fi
    ((span > $(left) - GRACE_S)) && span=$(($(left) - GRACE_S))
    step "brainprop reproduce $* --jobs $jobs into $name (at most $span s)"
    t0=$(now)
    timed "$span" "$PY" -m brainprop reproduce "$@" --jobs "$jobs" \
        --device "$DEVICE" --data-dir "$DATA" --out "$REPRO_DIR/$name" --quiet
    rc=$?
    if ((rc == 124)); then
        echo "reproduce $name stopped at its time limit, as planned: its runs saved their state"
    elif ((rc != 0)); then
        failed "reproduce $name failed: $rc"
    fi
    runs=$(find "$REPRO_DIR/$name/measurements" -type f 2>/dev/null | wc -l)
    echo "$name: reproduce $* --jobs $jobs: wall $(awk -v a="$t0" -v b="$(now)" \
        'BEGIN { printf "%.1f", b - a }') s, exit $rc, $runs runs measured in all" |
        tee -a "$REPRO_DIR/packing.txt"
    package
}

# stack_size SECONDS: the most seeds per stack (up to STACK) that step 2's stacked bench says
# will finish RUN_EPOCHS epochs of CELL in SECONDS, with both rules' stacks sharing the GPU;
# 1 where none would, where stacking did not pay, or without that bench. Its reasons go to the
# log. The step and evaluation times of a stack of k seeds are interpolated linearly between
# the bench's single seed and its stack of STACK.
stack_size() {
    "$PY" - "$OUT/bench-stack/bench.json" "$CELL" "$1" "$RUN_EPOCHS" "$STACK" <<'EOF'
import json, sys

path, cell, seconds, epochs, most = sys.argv[1:]
seconds, epochs, most = float(seconds), int(epochs), int(most)
try:
    rows = [r for r in json.load(open(path))["results"]
            if r.get("preset") == cell and r.get("stack_step_ms") is not None]
except (OSError, ValueError, KeyError):
    rows = []
if not rows or any(r["stack_speedup"] <= 1 for r in rows):
    why = "no stacked bench of it" if not rows else "stacking did not pay"
    print(f"{cell}: single runs ({why})", file=sys.stderr)
    print(1)
    sys.exit()


def run_seconds(r, k):
    share = (k - 1) / (r["stack_size"] - 1)
    step_s = (r["step_ms"] + share * (r["stack_step_ms"] - r["step_ms"])) / 1e3
    eval_s = r["eval_s_per_10k"] + share * (r["stack_eval_s_per_10k"] - r["eval_s_per_10k"])
    return epochs * (r["steps_per_epoch"] * step_s + eval_s)


size = 1
for k in range(1, most + 1):
    need = 2 * max(run_seconds(r, k) for r in rows)  # two stacks, one per rule, share the GPU
    print(f"{cell}: a stack of {k}: about {need:.0f} s for {epochs} epochs of both rules",
          file=sys.stderr)
    if need <= seconds:
        size = k
print(f"{cell}: stacks of {size} ({seconds:.0f} s left)", file=sys.stderr)
print(size)
EOF
}

if wants reproduce; then
    mkdir -p "$REPRO_DIR"
    if [[ -d $DATA/cifar10 ]]; then
        size=1 graphed=0
        if [[ $DEVICE == cuda && ($GRAPH == 1 || ($GRAPH == auto && " $PASSED " == *" fastpath "*)) ]]; then
            CIFAR+=(--cuda-graph)
            graphed=1
        fi
        # The stacked bench timed bf16 graphed steps on CUDA: it sizes only runs of that kind.
        # Startup (data, warm-up, capture) and the SIGTERM grace are not training time.
        if [[ $DEVICE != cuda || (${BF16:-0} == 1 && $graphed == 1 && " $PASSED " == *" stacked "*) ]]; then
            size=$(stack_size $(($(left) - GRACE_S - 30)))
        fi
        ((size > 1)) && CIFAR+=(--stack "$size")
        # The cell's runs measured in earlier windows are skipped by name, so it goes on from
        # there (packing.txt counts them among the cell's measurements).
        if [[ -n $MEASURED ]]; then
            mkdir -p "$REPRO_DIR/cifar10/measurements"
            cp "$MEASURED/${CELL/\//-}-"*.json "$REPRO_DIR/cifar10/measurements/" 2>/dev/null ||
                echo "no ${CELL} measurements in $MEASURED: the cell starts afresh"
        fi
        reproduce cifar10 2 "$(left)" "${CIFAR[@]}"
    else
        echo "no $DATA/cifar10: measuring run packing and stacking on MNIST instead"
        # A third of the time left each, the last taking what the others left.
        reproduce jobs-1 1 $((($(left) - GRACE_S) / 3)) "${PACKING[@]}"
        reproduce "jobs-$JOBS" "$JOBS" $((($(left) - GRACE_S) / 2)) "${PACKING[@]}"
        reproduce stack-4 1 "$(left)" "${PACKING[@]}" --stack 4
    fi
fi
