#!/usr/bin/env python3
"""Regenerate the measured tables in BENCHMARKS.md and README.md from bench/results.jsonl.

    python3 scripts/tables.py            rewrite every generated region
    python3 scripts/tables.py --check    change nothing; exit 1 naming each stale region
    python3 scripts/tables.py [--check] FILE...   the same on other files (default: BENCHMARKS.md README.md)

bench/results.jsonl holds one JSON object per measured row: "table" (an id below), "date"
(YYYY-MM-DD), "commit" (short hash or null), "machine", "command", and the row's columns. A
table shows, for each row key, its current record: the one with the newest date, and of
those the one furthest down the file (so append new measurements at the end). Older records
stay in the file as the history. A region of a document is the text between
`<!-- BEGIN GENERATED: ID -->` and `<!-- END GENERATED: ID -->`.
"""
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.jsonl"
DOCS = ["BENCHMARKS.md", "README.md", "docs/privacy.md"]
REQUIRED = ("table", "date", "commit", "machine", "command")


class Error(Exception):
    pass


@dataclass
class Col:
    field: str
    header: str
    dec: int | None = None  # decimals for floats (None: as stored)
    unit: str = ""


@dataclass
class Table:
    key: tuple
    cols: list
    rows: list | None = None  # the row keys shown, in order; None: every key, in file order
    per_row_source: bool = False  # add date and commit columns (rows from different runs)


MATRIX_COLS = [
    Col("model", "model"), Col("pass", "pass"), Col("setting", "setting"),
    Col("tee_only_enclave_ms", "tee-only enclave ms"), Col("scheme_enclave_ms", "scheme's enclave ms"),
    Col("ratio_x", "ratio", 2, "x"), Col("ratio_per_pair_x", "ratio per pair of steps", unit="x"),
    Col("enclave_gmac_scheme", "scheme's enclave G MAC", 2), Col("mb_to_device", "MB sent to device"), Col("peak_enclave_mib", "peak enclave MiB", 1),
    Col("phases_ms_subspace_split_noise_products", "ms: subspace / split / noise / low-rank products"),
]
SETTINGS = {"training": ["best", "best, `--protect-gradients off`", "energy threshold 0.1", "the paper's", "gpu-only (insecure)"],
            "inference": ["best", "energy threshold 0.1", "the paper's", "gpu-only (insecure)"]}
MODELS_PASSES = [(m, p) for m in ("vgg16", "resnet18") for p in ("training", "inference")]

TABLES = {
    "main_job": Table(("figure",), [Col("figure", "figure"), Col("value", "value"), Col("runs", "runs")],
                      rows=[("test accuracy",), ("epsilon per training sample (delta 1e-5)",),
                            ("test examples' epsilon over the 5 evaluations",), ("wall time, device verified",),
                            ("wall time, `--verify-device off`",), ("device results checked per run",),
                            ("closest an honest device came to the tolerance",)], per_row_source=True),
    "lenet5_epsilon": Table(("run",), [Col("run", "run"), Col("test_accuracy", "test accuracy"), Col("epsilon", "epsilon"),
                                       Col("gaussian_releases_per_sample", "Gaussian releases per sample"), Col("runs", "runs")],
                            rows=[("plaintext",), ("asymml, no noise",), ("asymml, z = 1",), ("asymml, z = 2 (default)",),
                                  ("asymml, z = 4",), ("asymml, z = 8",), ("asymml, z = 8, `--max-grad-norm 1`",)]),
    "lenet5_grad_clip": Table(("noise_multiplier", "max_grad_norm"),
                              [Col("noise_multiplier", "z"), Col("max_grad_norm", "`--max-grad-norm`"),
                               Col("test_accuracy", "test accuracy"), Col("runs", "runs")]),
    "fashion_mnist": Table(("scheme",), [Col("scheme", "scheme"), Col("test_accuracy_pct", "test accuracy", 1, "%"),
                                         Col("epsilon", "epsilon", 2), Col("wall_s", "wall time", 1, " s")],
                           rows=[("asymml (z = 2)",), ("plaintext",)]),
    "vgg11_bn_epsilon": Table(("run",), [Col("run", "run"), Col("test_accuracy_pct", "test accuracy", 1, "%"),
                                         Col("epsilon", "epsilon"), Col("gaussian_releases_per_sample", "Gaussian releases per sample"),
                                         Col("wall_s", "wall time", None, " s")],
                              rows=[("plaintext",), ("asymml, no noise",), ("asymml, z = 1",), ("asymml, z = 2 (default)",),
                                    ("asymml, z = 4",), ("asymml, z = 8",), ("asymml, z = 8, `--max-grad-norm 5`",)]),
    "asymml_matrix": Table(("model", "pass", "setting"), MATRIX_COLS,
                           rows=[(m, p, s) for m, p in MODELS_PASSES for s in SETTINGS[p]]),
    "asymml_verified": Table(("model", "pass"), [Col("model", "model"), Col("pass", "pass"),
                                                 Col("ratio_x", "ratio to tee-only", 2, "x"),
                                                 Col("verify_phase_ms", "`verify` phase ms"), Col("noise_phase_ms", "`noise` phase ms")],
                             rows=MODELS_PASSES),
    "verify_cost": Table(("model", "pass"), [Col("model", "model"), Col("pass", "pass"),
                                             Col("ratio_verified_x", "ratio, verified", 2, "x"),
                                             Col("ratio_per_pair_verified_x", "per pair of steps", unit="x"),
                                             Col("ratio_verify_off_x", "ratio, `--verify-device off`", 2, "x"),
                                             Col("verify_phase_ms", "`verify` phase ms")], rows=MODELS_PASSES),
    "scheme_step": Table(("model", "scheme", "pass"),
                         [Col("model", "model"), Col("scheme", "scheme"), Col("pass", "pass"), Col("step_ms", "step ms"),
                          Col("enclave_ms", "enclave ms"), Col("device_ms", "device ms"), Col("mb_to_device", "MB sent to device", 1),
                          Col("mb_from_device", "MB received from device", 1), Col("mb_sealed_spilled", "MB sealed+spilled", 1),
                          Col("seal_unseal_ms", "seal+unseal ms"), Col("peak_enclave_mib", "peak enclave MiB", 1)],
                         rows=[(m, s, p) for m in ("vgg16", "resnet18") for s in ("tee-only", "gpu-only")
                               for p in ("training", "inference")]),
    "larger_inputs": Table(("model", "input", "pass", "budget"),
                           [Col("model", "model"), Col("input", "input"), Col("pass", "pass"),
                            Col("tee_only_ms", "tee-only ms"), Col("tee_only_spill_mb", "tee-only spill MB"),
                            Col("tee_only_seal_ms", "tee-only seal ms"), Col("asymml_ms", "asymml ms"),
                            Col("ratio_x", "ratio", 2, "x"),
                            Col("phases_ms_subspace_split_noise_products_rest", "asymml ms: subspace / split / noise / products / rest")],
                           rows=[("vgg16", f"{n}x{n}", p, "96 MiB") for p in ("training", "inference") for n in (32, 64, 128)]
                           + [("resnet18", "64x64", p, "96 MiB") for p in ("training", "inference")]),
    "kernels": Table(("cpu",), [Col("cpu", "CPU"), Col("conv_fwd_1t_ms", "conv fwd ms, 1 thread"),
                                Col("conv_fwd_bwd_1t_ms", "conv fwd+bwd ms, 1 thread"),
                                Col("gemm_baseline_1t_ms", "GEMM baseline ms, 1 thread"),
                                Col("conv_fwd_2t_ms", "conv fwd ms, 2 threads"), Col("conv_fwd_bwd_2t_ms", "conv fwd+bwd ms, 2 threads"),
                                Col("vgg16_step_1t_ms", "VGG16 step ms, 1 thread"), Col("vgg16_step_2t_ms", "VGG16 step ms, 2 threads")],
                     rows=[("Zen 5 (AVX-512)",), ("Xeon (AVX-512)",), ("Zen 3 (AVX2)",)], per_row_source=True),
    "kernels_pytorch": Table(("cpu",), [Col("cpu", "CPU"), Col("ours_fwd_bwd_1t_ms", "ours, fwd+bwd ms, 1 thread"),
                                        Col("pytorch_fwd_bwd_1t_ms", "PyTorch, fwd+bwd ms, 1 thread"),
                                        Col("ratio_fwd_bwd_1t", "ours / PyTorch", unit="x"),
                                        Col("pytorch_fwd_1t_ms", "PyTorch, fwd ms, 1 thread"),
                                        Col("pytorch_fwd_bwd_2t_ms", "PyTorch, fwd+bwd ms, 2 threads")],
                             per_row_source=True),
    "link_cost": Table(("model", "pass"), [Col("model", "model"), Col("pass", "pass"),
                                           Col("plain_step_ms_median", "plain TCP, step ms (median)"),
                                           Col("link_step_ms_median", "link, step ms (median)"),
                                           Col("ratio_of_medians_x", "link / plain", 2, "x"),
                                           Col("ratio_per_pair_x", "per alternated pair", unit="x"),
                                           Col("runs_each", "runs each"),
                                           Col("mb_sent_per_step", "MB sent per step", 1),
                                           Col("mb_received_per_step", "MB received per step", 1)]),
    "link_throughput": Table(("round",), [Col("round", "round"), Col("plain_gbps", "plain TCP GB/s", 2),
                                          Col("link_gbps", "link GB/s", 2), Col("ratio_x", "link's time / plain's", 2, "x")]),
    "cryptgpu_vs_crypten": Table(("network", "pass", "batch"),
                                 [Col("network", "network"), Col("pass", "pass"), Col("batch", "batch"),
                                  Col("ours_s", "cryptgpu (ours), s", 3), Col("crypten_s", "CrypTen, s", 3),
                                  Col("speedup_x", "ours faster by", 1, "x"),
                                  Col("mb_per_party", "MB sent per party (ours)", 1), Col("rounds", "rounds (ours)"),
                                  Col("published_cryptgpu_gpu_s", "CryptGPU published (GPUs), s"),
                                  Col("published_piranha_gpu_s", "Piranha published (GPUs), s")]),
    "cryptgpu_steps": Table(("network", "pass", "batch"),
                            [Col("network", "network"), Col("input", "input"), Col("pass", "pass"), Col("batch", "batch"),
                             Col("step_s", "s per step", 2), Col("mb_per_party", "MB sent per party", 1),
                             Col("rounds", "rounds"), Col("published_cryptgpu_gpu_s", "CryptGPU published (GPUs), s")]),
    "cryptgpu_accuracy": Table(("run", "epochs"), [Col("run", "run"), Col("epochs", "epochs"),
                                          Col("test_accuracy_pct", "test accuracy", 2, "%"), Col("wall_s", "wall time", 0, " s")]),
    "ring_products": Table(("shape",), [Col("shape", "product"), Col("native_ms", "native u64 ms", 2),
                                        Col("limbs16_ms", "f64 limbs, 16-bit ms", 2), Col("limbs22_ms", "f64 limbs, 22-bit ms", 2),
                                        Col("f32_ms", "f32 GEMM ms (ceiling)", 2)]),
    "goten_accuracy": Table(("run",), [Col("run", "run"), Col("epochs", "epochs"),
                                       Col("test_accuracy_pct", "test accuracy", 2, "%"), Col("wall_s", "wall time", 0, " s")]),
    "goten_vgg_accuracy": Table(("model", "run"), [Col("model", "model"), Col("run", "run"), Col("train_samples", "training samples"),
                                                    Col("epochs", "epochs"), Col("epoch1_pct", "test accuracy after epoch 1", 2, "%"),
                                                    Col("test_accuracy_pct", "test accuracy", 2, "%"), Col("wall_s", "wall time", 0, " s")]),
    "goten_steps": Table(("model", "pass", "baseline"),
                         [Col("model", "model"), Col("pass", "pass"), Col("baseline", "baseline"),
                          Col("baseline_enclave_ms", "baseline's enclave ms", 0), Col("goten_enclave_ms", "goten's enclave ms", 0),
                          Col("ratio_x", "baseline / goten", 2, "x"), Col("goten_device_ms", "goten's servers' ms", 0),
                          Col("mb_to_servers", "MB to the servers", 0),
                          Col("phases_ms", "goten's enclave ms: share / masks / quantise / reconstruct / check")]),
    "privacy_attacks": Table(("dataset", "model", "run"),
                             [Col("run", "run"), Col("test_accuracy_pct", "test accuracy", 2, "%"), Col("epsilon", "epsilon", 2),
                              Col("mb_released", "MB released", 0), Col("attacked", "attacked release"),
                              Col("operand_psnr", "released operand: PSNR dB", 1),
                              Col("inverse_psnr", "learned inverse: PSNR dB", 1), Col("inverse_ssim", "SSIM", 3),
                              Col("inverse_label_pct", "label accuracy", 1, "%"),
                              Col("floor_psnr", "public mean: PSNR dB", 1), Col("floor_ssim", "SSIM", 3),
                              Col("labels_recovered_pct", "labels from the logits' gradient", 1, "%")]),
    "weight_difference": Table(("dataset", "model", "run", "layer"),
                               [Col("run", "run"), Col("layer", "layer (as the device saw it)"),
                                Col("recovered_norm", "gradient from two weights: norm", 3),
                                Col("device_part_norm", "the device's own part: norm", 3),
                                Col("hidden_pct", "the enclave's part, given away: % of the norm", 1, "%")]),
    "privacy_optimisation": Table(("dataset", "model", "run"),
                                  [Col("run", "run"), Col("epsilon", "epsilon (this 1-epoch run)", 2),
                                   Col("attacked", "attacked release"),
                                   Col("inverse_psnr", "learned inverse: PSNR dB", 1),
                                   Col("search_psnr", "optimisation inverse: PSNR dB", 1), Col("search_ssim", "SSIM", 3),
                                   Col("search_label_pct", "label accuracy", 1, "%"),
                                   Col("floor_psnr", "public mean: PSNR dB", 1)]),
    # History only (no region shows it): the sampler's timing test over the sampler's rewrites.
    "noise_sampler": Table(("measure",), [Col("measure", "measure"), Col("value", "value")]),
}

BENCH = "BENCHMARKS.md"
# The README's headline: (figure, value from the current records, where it is measured).
HEADLINE = [
    ("Main job (LeNet-5, embedded Fashion-MNIST, AsymML at z = 2): test accuracy",
     lambda c: f"{c('main_job', 'test accuracy')['value']} over {c('main_job', 'test accuracy')['runs']} runs",
     "the-main-job-lenet-5-on-the-embedded-data"),
    ("Main job: epsilon per training sample (delta 1e-5)",
     lambda c: c("main_job", "epsilon per training sample (delta 1e-5)")["value"], "the-main-job-lenet-5-on-the-embedded-data"),
    ("Main job: wall time, every device result verified",
     lambda c: c("main_job", "wall time, device verified")["value"], "the-main-job-lenet-5-on-the-embedded-data"),
    ("Plaintext, same model and data: test accuracy",
     lambda c: c("lenet5_epsilon", "plaintext")["test_accuracy"], "accuracy-against-epsilon-lenet-5-embedded-data"),
    ("AsymML's enclave time against tee-only, VGG16 training (best setting, verified); gpu-only's (insecure ceiling)",
     lambda c: ratio_pair(c, "vgg16"), "asymml-with-the-device-verified"),
    ("The same, ResNet18 training",
     lambda c: ratio_pair(c, "resnet18"), "asymml-with-the-device-verified"),
    ("Full Fashion-MNIST, LeNet-5, 5 epochs: AsymML test accuracy (plaintext)",
     lambda c: f"{fmt(c('fashion_mnist', 'asymml (z = 2)')['test_accuracy_pct'], 1, '%')} "
               f"({fmt(c('fashion_mnist', 'plaintext')['test_accuracy_pct'], 1, '%')})", "accuracy-against-epsilon-full-fashion-mnist"),
    ("CryptGPU (three parties, no TEE) against CrypTen on the same machine, LeNet: training step at batch 128; one inference",
     lambda c: f"{fmt(c('cryptgpu_vs_crypten', 'LeNet, average pooling', 'training', 128)['speedup_x'], 1, 'x')} faster; "
               f"{fmt(c('cryptgpu_vs_crypten', 'LeNet, average pooling', 'inference', 1)['speedup_x'], 1, 'x')} faster",
     "cryptgpu-against-crypten"),
    ("Goten (three servers, shares in Z_p): enclave time, VGG11 training, against tee-only's (the goal was 5x below)",
     lambda c: f"{fmt(1 / c('goten_steps', 'vgg11', 'training', 'tee-only')['ratio_x'], 1, 'x')} tee-only's",
     "goten-enclave-time-against-tee-only-and-gpu-only"),
    ("Full Fashion-MNIST, LeNet-5, 5 epochs: Goten test accuracy (plaintext)",
     lambda c: f"{fmt(c('goten_accuracy', 'goten (servers in this process)')['test_accuracy_pct'], 1, '%')} "
               f"({fmt(c('goten_accuracy', 'plaintext')['test_accuracy_pct'], 1, '%')})", "goten-accuracy-against-plaintext"),
    ("Convolution forward + backward, one thread: our time / PyTorch's",
     lambda c: "; ".join(f"{c('kernels_pytorch', k)['ratio_fwd_bwd_1t']}x on the {k}" for k in ("Xeon (AVX-512)", "Zen 3 (AVX2)")),
     "kernels-against-pytorch"),
]


def ratio_pair(c, model):
    v = c("asymml_verified", model, "training")
    g = c("asymml_matrix", model, "training", "gpu-only (insecure)")
    return f"{fmt(v['ratio_x'], 2, 'x')}; gpu-only {fmt(g['ratio_x'], 2, 'x')}"


def fmt(v, dec=None, unit=""):
    if v is None:
        return "-"
    if isinstance(v, list):
        return ", ".join(fmt(x, dec, unit) for x in v)
    if isinstance(v, float) and dec is not None:
        return f"{v:.{dec}f}{unit}"
    if isinstance(v, str) and not v[-1:].isdigit():
        return v  # text such as "10.3% (collapsed)" carries its own unit
    return f"{v}{unit}"


def load(path=RESULTS):
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise Error(f"{where}: not JSON: {e}")
        for f in REQUIRED:
            if f not in r:
                raise Error(f"{where}: missing \"{f}\"")
        t = TABLES.get(r["table"])
        if t is None:
            raise Error(f"{where}: unknown table \"{r['table']}\"")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(r["date"])):
            raise Error(f"{where}: date \"{r['date']}\" is not YYYY-MM-DD")
        missing = [c.field for c in t.cols if c.field not in r]
        if missing:
            raise Error(f"{where}: table {r['table']} needs column(s) {', '.join(missing)} (use null for not measured)")
        r["_line"] = n
        records.append(r)
    return records


def current(records, table_id):
    """Row key -> current record (newest date, then latest line), keys in order of first appearance."""
    t = TABLES[table_id]
    cur = {}
    for r in records:
        if r["table"] != table_id:
            continue
        k = tuple(r[f] for f in t.key)
        if k not in cur or r["date"] >= cur[k]["date"]:
            cur[k] = r
    if t.rows is None:
        return cur
    missing = [k for k in t.rows if k not in cur]
    if missing:
        raise Error(f"table {table_id}: no record for row(s) {missing}")
    return {k: cur[k] for k in t.rows}


def source_line(rows):
    by_machine = {}
    for r in rows:
        by_machine.setdefault(r["machine"], {}).setdefault(r["date"], set()).add(r["commit"])
    parts = []
    for m, dates in by_machine.items():
        runs = []
        for d, commits in sorted(dates.items()):
            named = sorted(c for c in commits if c) + (["a commit not recorded"] if None in commits else [])
            runs.append(f"{d} at {', '.join(named)}")
        parts.append(f"{m}: {'; '.join(runs)}")
    return "Measured on " + "; ".join(parts) + "."


def md(headers, body):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def render(records, table_id):
    if table_id == "headline":
        used = []

        def c(tid, *key):
            r = current(records, tid).get(tuple(key))
            if r is None:
                raise Error(f"headline: no current record {key} in table {tid}")
            used.append(r)
            return r
        body = [(fig, val(c), f"[{BENCH}]({BENCH}#{anchor})") for fig, val, anchor in HEADLINE]
        table = md(["figure", "value", "measured in"], body)
        return f"{table}\n\nGenerated from bench/results.jsonl by `python3 scripts/tables.py`. {source_line(used)}"
    if table_id not in TABLES:
        raise Error(f"unknown table id \"{table_id}\"")
    t = TABLES[table_id]
    rows = list(current(records, table_id).values())
    if not rows:
        raise Error(f"table {table_id}: no records")
    headers = [c.header for c in t.cols] + (["date", "commit"] if t.per_row_source else [])
    body = []
    for r in rows:
        cells = [fmt(r[c.field], c.dec, c.unit) for c in t.cols]
        if t.per_row_source:
            cells += [r["date"], r["commit"] or "-"]
        body.append(cells)
    return f"{md(headers, body)}\n\n{source_line(rows)}"


REGION = re.compile(r"(<!-- BEGIN GENERATED: (\S+) -->\n)(.*?)(<!-- END GENERATED: (\S+) -->)", re.S)


def regenerate(text, records, name):
    """The text with every region rewritten, and the ids of the regions that changed."""
    changed = []

    def sub(m):
        begin, tid, old, end, end_id = m.groups()
        if end_id != tid:
            raise Error(f"{name}: region {tid} ends with END GENERATED: {end_id}")
        new = "\n" + render(records, tid) + "\n\n"
        if new != old:
            changed.append(tid)
        return begin + new + end
    out = REGION.sub(sub, text)
    opened = re.findall(r"<!-- BEGIN GENERATED: (\S+) -->", text)
    if len(opened) != len(REGION.findall(text)):
        raise Error(f"{name}: a BEGIN GENERATED marker without its END")
    return out, changed, len(opened)


def main(argv):
    check = "--check" in argv
    files = [a for a in argv if a != "--check"] or [str(ROOT / d) for d in DOCS]
    try:
        records = load()
        stale, total = [], 0
        for f in files:
            p = Path(f)
            if not p.exists():
                raise Error(f"{f}: no such file")
            text = p.read_text()
            new, changed, n = regenerate(text, records, p.name)
            total += n
            stale += [f"{p.name}: {tid}" for tid in changed]
            if changed and not check:
                p.write_text(new)
    except Error as e:
        print(f"tables.py: {e}", file=sys.stderr)
        return 2
    if check:
        if stale:
            for s in stale:
                print(f"stale: {s}")
            print("run python3 scripts/tables.py to regenerate them")
            return 1
        print(f"all {total} generated tables are current")
        return 0
    print(f"{len(stale)} of {total} generated tables rewritten" + (": " + ", ".join(stale) if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
