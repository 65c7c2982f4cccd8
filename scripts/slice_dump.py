#!/usr/bin/env python3
"""Slices a kvc KV dump (a directory of .npy files) along its token axis, without numpy.

Usage:
  python3 scripts/slice_dump.py SRC_DIR DST_DIR --tokens 512

Every array whose shape holds the source's token count T along an axis is cut to the first
--tokens entries of that axis (q/k/k_prerope/v: [L, H, T, D], input_bytes: [T]); all other axes are
kept whole. The output is standard .npy version 1.0: the header dict is padded with spaces so that
preamble + header is a multiple of 64 bytes, and ends in a newline. meta.json is rewritten with the
dump's shapes and the provenance of the slice.
"""

import argparse
import ast
import json
import os
import struct
import sys

MAGIC = b"\x93NUMPY"
DTYPE_SIZES = {"<f2": 2, "<f4": 4, "<f8": 8, "|u1": 1, "<u1": 1, "|i1": 1, "<i4": 4, "<i8": 8}
TENSOR_FILES = ("q.npy", "k.npy", "k_prerope.npy", "v.npy", "input_bytes.npy")


def read_npy(path):
    """Returns (descr, shape, raw little-endian C-order bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != MAGIC:
        sys.exit(f"{path}: not an .npy file (magic {data[:6]!r})")
    major, minor = data[6], data[7]
    if major == 1:
        (header_len,) = struct.unpack("<H", data[8:10])
        start = 10
    elif major in (2, 3):
        (header_len,) = struct.unpack("<I", data[8:12])
        start = 12
    else:
        sys.exit(f"{path}: unsupported .npy version {major}.{minor}")
    header = ast.literal_eval(data[start : start + header_len].decode("latin1"))
    if header["fortran_order"]:
        sys.exit(f"{path}: Fortran-order arrays are not supported")
    descr = header["descr"]
    if descr not in DTYPE_SIZES:
        sys.exit(f"{path}: dtype {descr} not in {sorted(DTYPE_SIZES)}")
    shape = tuple(header["shape"])
    payload = data[start + header_len :]
    count = 1
    for s in shape:
        count *= s
    if len(payload) != count * DTYPE_SIZES[descr]:
        sys.exit(f"{path}: payload {len(payload)} bytes, expected {count * DTYPE_SIZES[descr]}")
    return descr, shape, payload


def write_npy(path, descr, shape, payload):
    shape_text = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}"
    preamble = 10  # magic (6) + version (2) + header length (2)
    total = preamble + len(header) + 1  # + the closing newline
    header += " " * ((64 - total % 64) % 64) + "\n"
    assert (preamble + len(header)) % 64 == 0
    with open(path, "wb") as f:
        f.write(MAGIC + bytes([1, 0]) + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(payload)


def slice_leading_tokens(descr, shape, payload, axis, tokens):
    """Keeps entries [0, tokens) of `axis` of a C-order array."""
    item = DTYPE_SIZES[descr]
    outer = 1
    for s in shape[:axis]:
        outer *= s
    inner = item
    for s in shape[axis + 1 :]:
        inner *= s
    src_block = shape[axis] * inner
    keep = tokens * inner
    out = bytearray()
    for o in range(outer):
        out += payload[o * src_block : o * src_block + keep]
    new_shape = shape[:axis] + (tokens,) + shape[axis + 1 :]
    return new_shape, bytes(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--source-name", default=None,
                        help="how meta.json names the source, e.g. realmodel/seq0")
    args = parser.parse_args()

    with open(os.path.join(args.src, "meta.json")) as f:
        source_meta = json.load(f)
    total_tokens = int(source_meta["T"])
    if not 0 < args.tokens <= total_tokens:
        sys.exit(f"--tokens {args.tokens} out of range [1, {total_tokens}]")
    os.makedirs(args.dst, exist_ok=True)

    shapes = {}
    for name in TENSOR_FILES:
        descr, shape, payload = read_npy(os.path.join(args.src, name))
        axis = len(shape) - 2 if len(shape) == 4 else 0  # [L, H, T, D] or [T]
        if shape[axis] != total_tokens:
            sys.exit(f"{name}: axis {axis} has {shape[axis]} entries, expected T = {total_tokens}")
        new_shape, sliced = slice_leading_tokens(descr, shape, payload, axis, args.tokens)
        write_npy(os.path.join(args.dst, name), descr, new_shape, sliced)
        shapes[name] = new_shape
        print(f"{name}: {descr} {list(shape)} -> {list(new_shape)}")

    layers, q_heads, _, head_dim = shapes["q.npy"]
    kv_heads = shapes["k.npy"][1]
    source_name = args.source_name or os.path.normpath(args.src)
    meta = {
        "model": f"kvc-realmodel byte-level Llama ({layers} layers, {q_heads} q heads, "
                 f"{kv_heads} kv heads, head_dim {head_dim})",
        "rope_theta": 10000.0,
        "rope_convention": "rotate_half",
        "layers": layers,
        "q_heads": q_heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "tokens": args.tokens,
        "source": {key: source_meta[key] for key in ("pkg", "path", "bpb", "index")},
        "sliced_from": f"{source_name} tokens [0,{args.tokens})",
    }
    with open(os.path.join(args.dst, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
