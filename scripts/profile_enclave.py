"""Where the enclave's time goes in a `trustsplit bench step` run, by function, from `perf`.

Usage (Linux with `perf`; a release build carries debug info, see the workspace Cargo.toml):

    python3 scripts/profile_enclave.py target/release/trustsplit bench step --scheme asymml \
        --model vgg16 --basis batch --rank-schedule 1,2,4,4,8 --subspace fast --device cpu:1 \
        --baseline none --steps 14

It records with DWARF call graphs, starting 4 s in (past start-up and the warm-up steps, which
fault in memory and would otherwise dominate: PROFILE_DELAY_MS changes it), then keeps the
samples of the busiest thread that is not the CPU device's (`cpu-device-*`): the enclave's.
It prints the share of that thread's samples in each of our functions, inclusive of what they
call, and the leaf functions where the samples landed; with PROFILE_CALLERS=SUBSTRING, also
which of our functions the samples whose leaf contains SUBSTRING were called from. Those shares
are what the enclave's optimisations were chosen by (the module docs cite them).
"""
import collections
import os
import subprocess
import sys
import tempfile


def samples(script_output):
    """(thread id, thread name, [frames leaf first]) for each sample of `perf script`."""
    current = None
    for line in script_output.splitlines():
        if not line.strip():
            if current:
                yield current
            current = None
        elif not line.startswith("\t"):
            name, tid = line.split()[:2]
            current = (tid, name, [])
        elif current is not None:
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                current[2].append(parts[1].replace(" (inlined)", ""))
    if current:
        yield current


def is_ours(frame):
    """A frame of one of our functions (closures are counted in the function that holds them)."""
    return "trustsplit" in frame and "{{closure}}" not in frame


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    delay = os.environ.get("PROFILE_DELAY_MS", "4000")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        record = ["perf", "record", "-D", delay, "--call-graph", "dwarf,8192", "-F", "1500", "-o", data]
        subprocess.run(record + sys.argv[1:], check=True)
        script = subprocess.run(
            ["perf", "script", "-i", data, "-F", "comm,tid,ip,sym"], check=True, capture_output=True, text=True
        ).stdout
    by_thread = collections.defaultdict(list)
    names = {}
    for tid, name, frames in samples(script):
        by_thread[tid].append(frames)
        names[tid] = name
    candidates = [t for t in by_thread if not names[t].startswith("cpu-device")]
    if not candidates:
        sys.exit("no samples outside the device's threads")
    tid = max(candidates, key=lambda t: len(by_thread[t]))
    chosen = by_thread[tid]
    total = len(chosen)
    inclusive, leaves = collections.Counter(), collections.Counter()
    for frames in chosen:
        if frames:
            leaves[frames[0]] += 1
        for frame in set(frames):
            if is_ours(frame):
                inclusive[frame] += 1
    print(f"thread {tid} ({names[tid]}): {total} samples")
    print("\ninclusive, our functions:")
    for frame, n in inclusive.most_common(60):
        print(f"{100 * n / total:5.1f}%  {frame[:150]}")
    print("\nleaf functions:")
    for frame, n in leaves.most_common(25):
        print(f"{100 * n / total:5.1f}%  {frame[:150]}")
    # PROFILE_CALLERS=SUBSTRING: which of our functions the samples whose leaf matches land in
    # (e.g. `copy_nonoverlapping` or `memcpy`: where the enclave copies).
    pattern = os.environ.get("PROFILE_CALLERS")
    if pattern:
        callers = collections.Counter()
        for frames in chosen:
            if frames and pattern in frames[0]:
                ours = [f for f in frames if is_ours(f)]
                callers[" <- ".join(f.split("::")[-1][:60] for f in ours[:3]) or "(none of ours)"] += 1
        print(f"\nleaves matching {pattern!r}, by our nearest callers:")
        for chain, n in callers.most_common(25):
            print(f"{100 * n / total:5.1f}%  {chain}")


if __name__ == "__main__":
    main()
