"""Teacher KV shards on disk: the format, a streaming writer, the manifest and the reader.

A shard is one safetensors file holding n examples packed without padding (T = their total
tokens, H x D = the teacher's KV heads x head_dim, l = a stored teacher layer):

    offsets        int64  [n+1]      example i is rows offsets[i]:offsets[i+1] of every [T, ...]
    input_ids      int32  [T]        the teacher's tokens of `text` (read back as int64)
    char_spans     int32  [T, 2]     [start, end) characters of `text` per token; (0, 0) for
                                     special tokens such as BOS
    k.<l>, v.<l>   dtype  [T, H, D]  bf16 / fp16 / fp32, or fp8 (float8_e4m3fn) with:
    k_scale.<l>    f32    [n, H, D]  K = k * k_scale[i]: per example, per channel (keys have
                                     outlier channels, so a channel shares one scale)
    v_scale.<l>    f32    [T, H]     V = v * v_scale[..., None]: per token and head

Its metadata (strings): format, teacher, weights_sha256, dtype, key_space, compute_dtype,
layers, kv_shape, tokenizer and ids (JSON). Nothing in a shard depends on where or when it was
written, so a rerun is bit-identical.

The manifest (`kv/<teacher>/<split>/manifest.json`) lists the shards with path (relative to
the manifest unless absolute), sha256, examples, tokens, bytes and ids, plus the teacher's
identity, tokenizer, dtype, key_space and layers.
"""

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from kava.errors import KavaError
from kava.io import read_json

FORMAT = "kava-kv/1"
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                  "fp8": torch.float8_e4m3fn}
# In the order safetensors lays tensors out (by its dtype enum, descending; then by name).
SAFETENSORS_DTYPES = {torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
                      torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}
DTYPE_ORDER = list(SAFETENSORS_DTYPES)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
# What a training config may pin, and where the manifest keeps it.
EXPECTABLE = {"teacher": ("teacher", "name"), "weights_sha256": ("teacher", "weights_sha256"),
              "dtype": ("dtype",), "key_space": ("key_space",), "layers": ("layers",)}


def shard_layout(n_examples, n_tokens, layers, kv_shape, dtype):
    """{tensor name: (torch dtype, shape)} of a shard."""
    n_heads, head_dim = kv_shape
    layout = {"offsets": (torch.int64, (n_examples + 1,)),
              "input_ids": (torch.int32, (n_tokens,)),
              "char_spans": (torch.int32, (n_tokens, 2))}
    for layer in layers:
        for kind in ("k", "v"):
            layout[f"{kind}.{layer}"] = (STORAGE_DTYPES[dtype], (n_tokens, n_heads, head_dim))
        if dtype == "fp8":
            layout[f"k_scale.{layer}"] = (torch.float32, (n_examples, n_heads, head_dim))
            layout[f"v_scale.{layer}"] = (torch.float32, (n_tokens, n_heads))
    return layout


class ShardWriter:
    """A safetensors file laid out in full up front (header first, data zero-filled), whose
    tensors are then filled in place through a memory map, batch by batch. The shard never has
    to fit in host memory, and each batch's write overlaps the next batch's forward.

    The header is written here rather than by safetensors' save_file, which serialises
    metadata from a hash map in a different order on every run: shards must be bit-identical.
    Tensors are laid out as save_file lays them out (wider dtypes first, then by name), so each
    starts aligned and a reader can view it without copying."""

    def __init__(self, path, layout, metadata):
        names = sorted(layout, key=lambda name: (DTYPE_ORDER.index(layout[name][0]), name))
        header, spans, start = {"__metadata__": dict(sorted(metadata.items()))}, {}, 0
        for name in names:
            dtype, shape = layout[name]
            end = start + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [start, end]}
            spans[name], start = (start, end), end
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        prefix = len(encoded).to_bytes(8, "little") + encoded
        with open(path, "wb") as handle:
            handle.write(prefix)
            handle.truncate(len(prefix) + start)
        self._digest = hashlib.sha256(prefix)
        self._map = np.memmap(path, dtype=np.uint8, mode="r+", offset=len(prefix), shape=(start,))
        self.tensors = {name: torch.from_numpy(self._map[a:b]).view(layout[name][0])
                        .view(layout[name][1]) for name, (a, b) in spans.items()}

    def close(self):
        """Unmap the file; return its sha256, hashed from the mapping rather than read back.
        No msync: the kernel writes the pages back whatever happens to this process, and the
        rename that publishes the shard comes after."""
        self._digest.update(self._map)
        self.tensors = self._map = None
        return self._digest.hexdigest()


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def quantize_fp8(k, v, valid):
    """fp8 K and V of a padded batch ([B, T, H, D], `valid` [B, T] bool) and their scales:
    K per example and channel [B, H, D] (pads excluded), V per token and head [B, T, H]."""
    k, v = k.float(), v.float()
    k_amax = (k.abs() * valid[:, :, None, None]).amax(dim=1)
    v_amax = v.abs().amax(dim=-1)
    # A channel or token that is all zeros keeps scale 1, so it stays exactly zero.
    k_scale = torch.where(k_amax > 0, k_amax / FP8_MAX, torch.ones_like(k_amax))
    v_scale = torch.where(v_amax > 0, v_amax / FP8_MAX, torch.ones_like(v_amax))
    # Clamp: x / (amax / 448) can round a hair above 448, and e4m3fn has no inf to saturate to.
    k_q = (k / k_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    v_q = (v / v_scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return k_q, k_scale, v_q, v_scale


def build_manifest(card, data_info, split, shard_infos, manifest_path):
    """The manifest of one teacher x split from its shards' sidecars, checked for agreement
    with each other and for covering every row of the split exactly once."""
    if not shard_infos:
        raise KavaError(f"{manifest_path}: no shards to list")
    shared = ("dtype", "key_space", "compute_dtype", "layers", "kv_shape", "tokenizer",
              "max_length", "on_too_long")
    first = shard_infos[0]
    for info in shard_infos:
        differing = [key for key in shared if info[key] != first[key]]
        if differing:
            raise KavaError(f"shard {info['path']}: {differing[0]} {info[differing[0]]!r} differs "
                            f"from shard {first['path']}'s {first[differing[0]]!r}")
    rows = data_info["splits"][split]["rows"]
    covered = [row for info in shard_infos for row in range(*info["rows"])]
    if covered != list(range(rows)):
        raise KavaError(f"{manifest_path}: shards cover rows {[i['rows'] for i in shard_infos]}, "
                        f"not 0..{rows} of split '{split}' once each")
    examples = sum(info["examples"] for info in shard_infos)
    if examples == 0:
        raise KavaError(f"teacher {card['name']} split {split}: every example was skipped as longer "
                        f"than data.max_length {first['max_length']} (data.on_too_long: skip)")
    base = Path(manifest_path).parent
    tokens = sum(info["tokens"] for info in shard_infos)
    n_bytes = sum(info["bytes"] for info in shard_infos)
    return {
        "format": FORMAT,
        "teacher": {key: card[key] for key in ("name", "source", "weights_sha256", "quantize",
                                                "architecture")},
        "split": split,
        "data": {key: data_info[key] for key in ("source", "path")}
                | {key: data_info["splits"][split][key] for key in ("rows", "sha256")},
        **{key: first[key] for key in shared},
        "examples": examples,
        "tokens": tokens,
        "bytes": n_bytes,
        "bytes_per_token": n_bytes / tokens,
        "truncated": sum(len(info["truncated"]) for info in shard_infos),
        "skipped": sum(len(info["skipped"]) for info in shard_infos),
        "skipped_ids": [i for info in shard_infos for i in info["skipped"]],
        "shards": [{"path": info["path"] if os.path.isabs(info["path"])
                    else os.path.relpath(info["path"], base),
                    **{key: info[key] for key in ("sha256", "examples", "tokens", "bytes", "ids")}}
                   for info in shard_infos],
    }


# Shards verified by this process: (resolved path, sha256). Hashing a multi-GB shard once per
# process is the price of never training on a corrupted one; twice would be waste.
_VERIFIED = set()


class KVStore:
    """Per-example teacher K/V of one teacher x split, read from its manifest.

    `expect` pins what the caller's config asks for: any of teacher, weights_sha256, dtype,
    key_space (equal) and layers (each must be stored). Shards are verified (size, sha256,
    metadata) on first access to each, once per process. K/V of bf16/fp16/fp32 shards are
    zero-copy views of the memory-mapped file; fp8 is dequantised to float32."""

    def __init__(self, manifest_path, expect=None):
        self.path = Path(manifest_path)
        try:
            self.manifest = read_json(self.path)
        except (OSError, ValueError) as err:
            raise KavaError(f"manifest {self.path}: unreadable ({type(err).__name__})") from None
        shards = self.manifest.get("shards")
        if not shards:
            raise KavaError(f"manifest {self.path}: lists no shards")
        self._check_expect(expect or {})
        self.layers = list(self.manifest["layers"])
        self.kv_shape = tuple(self.manifest["kv_shape"])
        self.dtype = self.manifest["dtype"]
        self.ids = [example_id for shard in shards for example_id in shard["ids"]]
        self._index = {example_id: i for i, example_id in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise KavaError(f"manifest {self.path}: example ids repeat")
        self._starts = np.cumsum([0] + [len(shard["ids"]) for shard in shards]).tolist()
        self._open = {}

    def _check_expect(self, expect):
        for field, wanted in expect.items():
            if field not in EXPECTABLE:
                raise KavaError(f"KVStore expect: unknown field '{field}' "
                                f"(known: {', '.join(EXPECTABLE)})")
            stored = self.manifest
            for key in EXPECTABLE[field]:
                stored = stored[key]
            missing = [layer for layer in wanted if layer not in stored] if field == "layers" else []
            if missing or (field != "layers" and stored != wanted):
                raise KavaError(f"manifest {self.path}: {field} is {stored!r}, the config asks for "
                                f"{wanted!r}")

    def __len__(self):
        return len(self.ids)

    def index_of(self, example_id):
        try:
            return self._index[example_id]
        except KeyError:
            raise KavaError(f"manifest {self.path}: no example '{example_id}'") from None

    def _shard(self, number):
        if number not in self._open:
            self._open[number] = self._verify_and_open(self.manifest["shards"][number])
        return self._open[number]

    def _verify_and_open(self, entry):
        path = (self.path.parent / entry["path"]).resolve()
        if not path.is_file():
            raise KavaError(f"shard {path}: missing (listed in {self.path}); recompute that "
                            f"shard alone by building its path")
        if (str(path), entry["sha256"]) not in _VERIFIED:
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise KavaError(f"shard {path}: {size} bytes, the manifest says {entry['bytes']} "
                                f"(truncated or rewritten)")
            if sha256_file(path) != entry["sha256"]:
                raise KavaError(f"shard {path}: sha256 differs from the manifest (corrupted)")
            _VERIFIED.add((str(path), entry["sha256"]))
        handle = safe_open(str(path), framework="pt")
        meta = handle.metadata()
        expected = {"format": FORMAT, "teacher": self.manifest["teacher"]["name"],
                    "weights_sha256": self.manifest["teacher"]["weights_sha256"],
                    "dtype": self.dtype, "key_space": self.manifest["key_space"],
                    "layers": json.dumps(self.manifest["layers"]), "ids": json.dumps(entry["ids"])}
        for key, value in expected.items():
            if meta.get(key) != value:
                raise KavaError(f"shard {path}: metadata {key} does not match {self.path}")
        # get_tensor views the file's one memory map; slicing these views copies nothing.
        return {name: handle.get_tensor(name) for name in handle.keys()}

    def example(self, i):
        """{id, input_ids [T], char_spans [T, 2], k {layer: [T, H, D]}, v {layer: [T, H, D]}}."""
        if not 0 <= i < len(self.ids):
            raise IndexError(f"example {i} out of range for {len(self.ids)} examples")
        number = bisect.bisect_right(self._starts, i) - 1
        local = i - self._starts[number]
        tensors = self._shard(number)
        start, end = tensors["offsets"][local:local + 2].tolist()
        k, v = {}, {}
        for layer in self.layers:
            k[layer] = tensors[f"k.{layer}"][start:end]
            v[layer] = tensors[f"v.{layer}"][start:end]
            if self.dtype == "fp8":
                k[layer] = k[layer].float() * tensors[f"k_scale.{layer}"][local]
                v[layer] = v[layer].float() * tensors[f"v_scale.{layer}"][start:end, :, None]
        return {"id": self.ids[i], "input_ids": tensors["input_ids"][start:end].long(),
                "char_spans": tensors["char_spans"][start:end].long(), "k": k, "v": v}
