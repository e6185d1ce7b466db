#!/usr/bin/env bash
# Regenerates crates/data/embedded/: the first 5000 training and first 1000
# test images/labels of Fashion-MNIST, as gzip'd IDX files.
#
# Source: Debian's dataset-fashion-mnist package (installs
# /usr/share/datasets/fashion-mnist/*.gz). Override with SRC=/path/to/dir.
#
# The output is byte-for-byte reproducible for a given zlib: gzip headers carry
# no file name and a zero mtime. Usage: scripts/make_embedded_dataset.sh
set -euo pipefail

SRC="${SRC:-/usr/share/datasets/fashion-mnist}"
DST="$(cd "$(dirname "$0")/.." && pwd)/crates/data/embedded"
N_TRAIN=5000
N_TEST=1000

mkdir -p "$DST"
python3 - "$SRC" "$DST" "$N_TRAIN" "$N_TEST" <<'PY'
import gzip, io, os, struct, sys

src, dst, n_train, n_test = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def head_idx(name, n):
    """Return an IDX file holding the first n items of src/name (gzip'd)."""
    with gzip.open(os.path.join(src, name), "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    ndims = magic & 0xFF
    assert magic >> 8 == 0x08, f"{name}: not a u8 IDX file"
    assert count >= n, f"{name}: only {count} items"
    dims = struct.unpack(">" + "I" * (ndims - 1), data[8:4 + 4 * ndims])
    item = 1
    for d in dims:
        item *= d
    header_len = 4 + 4 * ndims
    header = struct.pack(">II", magic, n) + data[8:header_len]
    return header + data[header_len:header_len + n * item]

def write_gz(name, payload):
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of varying metadata.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as g:
        g.write(payload)
    with open(os.path.join(dst, name), "wb") as f:
        f.write(buf.getvalue())

for split, n in (("train", n_train), ("t10k", n_test)):
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{split}-{kind}.gz"
        write_gz(name, head_idx(name, n))
PY
(cd "$DST" && ls -l *.gz && sha256sum *.gz)
