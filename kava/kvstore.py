"""Teacher KV shards on disk: the format, a streaming writer, the manifest and the reader.

A shard is one safetensors file holding n examples packed without padding (T = their total
tokens, H x D = the teacher's KV heads x head_dim, l = a stored teacher layer, G = the shard's
scale groups, which are the batches of its forward):

    offsets        int64  [n+1]      example i is rows offsets[i]:offsets[i+1] of every [T, ...]
    input_ids      int32  [T]        the teacher's tokens of `text` (read back as int64)
    char_spans     int32  [T, 2]     [start, end) characters of `text` per token; (0, 0) for
                                     special tokens such as BOS
    k.<l>, v.<l>   dtype  [T, H, D]  bf16 / fp16 / fp32, or fp8 (float8_e4m3fn) with:
    group          int32  [n]        the scale group (forward batch) of each example
    k_exp.<l>,     int8   [G, H, D]  K = k * 2**k_exp[group]: a power-of-two scale per group
    v_exp.<l>                        and channel (keys have outlier channels, so a channel
                                     shares one scale; one byte, so scales cost ~nothing)
    or, for pca:
    k.<l>, v.<l>   fp8    [T, r_l]   coefficients on the teacher's basis (fit_basis, stored once
                                     per teacher in its basis file), with group, k_exp.<l>,
                                     v_exp.<l> [G, r_l] per component:
                                     K = mean_k.<l> + (k * 2**k_exp[group]) @ basis_k.<l>

With stored logits (precompute.logits_k > 0, a teacher some arm distils from), per token the
teacher's next-token distribution there (the logits at token t predict token t+1):

    top_logp       dtype  [T, k]     the k largest log-probabilities, descending (bf16/fp16/fp32)
    top_ids        uint16 [T, k]     their token ids (int32 when the vocabulary exceeds 65536)
    tail_logp      f32    [T]        log(1 - sum of the k probabilities): the rest of the mass

Its metadata (strings): format, teacher, weights_sha256, dtype, key_space, compute_dtype,
layers, kv_shape, tokenizer, logits ({k, dtype, ids} or null), ids (JSON) and, for pca,
basis_sha256. Nothing in a shard depends on where or when it was written, so a rerun is
bit-identical.

A basis file (`kv/<teacher>/basis.safetensors`) holds per stored layer and kind (k, v)
`mean_<kind>.<l>` f32 [H*D] and `basis_<kind>.<l>` f32 [r_l, H*D] (orthonormal rows, the
leading principal components of a sample of train KV), with metadata format, teacher,
weights_sha256, key_space, layers, kv_shape, variance and examples.

The manifest (`kv/<teacher>/<split>/manifest.json`) lists the shards with path (relative to
the manifest unless absolute), sha256, examples, tokens, bytes and ids, plus the teacher's
identity, tokenizer, dtype, key_space, layers and, for pca, the basis file's path and sha256.
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

FORMAT = "kava-kv/2"
BASIS_FORMAT = "kava-basis/1"
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                  "fp8": torch.float8_e4m3fn, "pca": torch.float8_e4m3fn}
# Formats whose stored values carry a power-of-two scale per group and channel.
SCALED = ("fp8", "pca")
KINDS = ("k", "v")
# In the order safetensors lays tensors out (by its dtype enum, descending; then by name).
SAFETENSORS_DTYPES = {torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
                      torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16",
                      torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8"}
DTYPE_ORDER = list(SAFETENSORS_DTYPES)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
# Exponents whose 2**e is a normal float32: the scale multiplies exactly.
EXP_RANGE = (-126, 127)
# What a training config may pin, and where the manifest keeps it.
EXPECTABLE = {"teacher": ("teacher", "name"), "weights_sha256": ("teacher", "weights_sha256"),
              "dtype": ("dtype",), "key_space": ("key_space",), "layers": ("layers",)}


LOGIT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Top-k ids in two bytes where the vocabulary fits (SmolLM2: 49152), which halves the id bytes.
ID_DTYPES = {"uint16": torch.uint16, "int32": torch.int32}
LOGIT_TENSORS = ("top_logp", "top_ids", "tail_logp")


def logits_spec(k, dtype, vocab_size):
    """The shard's `logits` metadata: k, the log-prob dtype and the narrowest id dtype."""
    return {"k": k, "dtype": dtype, "ids": "uint16" if vocab_size <= 1 << 16 else "int32"}


def logits_layout(n_tokens, spec):
    """{tensor name: (torch dtype, shape)} of a shard's stored top-k logits."""
    return {"top_logp": (LOGIT_DTYPES[spec["dtype"]], (n_tokens, spec["k"])),
            "top_ids": (ID_DTYPES[spec["ids"]], (n_tokens, spec["k"])),
            "tail_logp": (torch.float32, (n_tokens,))}


def shard_layout(n_examples, n_tokens, layers, kv_shape, dtype, n_groups=1, ranks=None):
    """{tensor name: (torch dtype, shape)} of a shard. `ranks` ({"k.<l>": r, ...}): the basis
    components per layer and kind of a pca shard."""
    layout = {"offsets": (torch.int64, (n_examples + 1,)),
              "input_ids": (torch.int32, (n_tokens,)),
              "char_spans": (torch.int32, (n_tokens, 2))}
    if dtype in SCALED:
        layout["group"] = (torch.int32, (n_examples,))
    for layer in layers:
        for kind in KINDS:
            name = f"{kind}.{layer}"
            channels = (ranks[name],) if dtype == "pca" else tuple(kv_shape)
            layout[name] = (STORAGE_DTYPES[dtype], (n_tokens, *channels))
            if dtype in SCALED:
                layout[f"{kind}_exp.{layer}"] = (torch.int8, (n_groups, *channels))
    return layout


def safetensors_header(layout, metadata):
    """(the bytes before the data, {name: (start, end) in the data}) of a safetensors file of
    `layout` {name: (dtype, shape)}, the same bytes on every run: safetensors' save_file
    serialises metadata from a hash map in a different order on every run. Tensors are laid out
    as save_file lays them out (wider dtypes first, then by name), so each starts aligned."""
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
    return len(encoded).to_bytes(8, "little") + encoded, spans


def write_safetensors(path, tensors, metadata):
    """save_file's format, bit-identical from run to run (safetensors_header)."""
    prefix, spans = safetensors_header({name: (t.dtype, tuple(t.shape))
                                        for name, t in tensors.items()}, metadata)
    with open(path, "wb") as handle:
        handle.write(prefix)
        for name in spans:
            handle.write(tensors[name].detach().cpu().contiguous().reshape(-1)
                         .view(torch.uint8).numpy().tobytes())


class ShardWriter:
    """A safetensors file laid out in full up front (header first, data zero-filled), whose
    tensors are then filled in place through a memory map, batch by batch. The shard never has
    to fit in host memory, and each batch's write overlaps the next batch's forward.

    The header is safetensors_header's, not save_file's: shards must be bit-identical. Each
    tensor starts aligned, so a reader can view it without copying."""

    def __init__(self, path, layout, metadata):
        prefix, spans = safetensors_header(layout, metadata)
        start = max((end for _, end in spans.values()), default=0)
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


def quantize_fp8(x, valid):
    """x [B, T, *C] of a padded batch (`valid` [B, T]: its real tokens) → (float8_e4m3fn values,
    int8 exponents [*C]) with x ≈ values * 2**exponent: per channel, the smallest power of two
    that brings the channel's largest real magnitude within e4m3's range. A power of two makes
    the scaling exact and fits one byte; a channel that is all zeros gets 2**0 and stays zero."""
    x = x.float()
    mask = valid.reshape(*valid.shape, *[1] * (x.dim() - 2))
    amax = torch.where(mask, x.abs(), 0).amax(dim=(0, 1))
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / FP8_MAX)), 0).clamp(*EXP_RANGE)
    # Clamp: log2 can round a hair low, and e4m3fn has no inf to saturate to.
    values = (x * torch.exp2(-exp)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, exp.to(torch.int8)


def write_basis(path, tensors, metadata):
    """A basis file from {name: tensor} (mean_<kind>.<l> [H*D], basis_<kind>.<l> [r, H*D]);
    returns its sha256."""
    writer = ShardWriter(path, {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()},
                         {"format": BASIS_FORMAT, **metadata})
    for name, tensor in tensors.items():
        writer.tensors[name].copy_(tensor)
    return writer.close()


def read_basis(path, sha256, expected):
    """{name: tensor} of a basis file, checked against `sha256` (the manifest's; None when the
    caller has just hashed it itself) and `expected` metadata ({key: string}), and for a mean
    and a basis of consistent shapes per stored layer and kind."""
    path = Path(path)
    if not path.is_file():
        raise KavaError(f"basis {path}: missing; rebuild it (rule kv_basis)")
    if sha256 is not None and sha256_file(path) != sha256:
        raise KavaError(f"basis {path}: sha256 differs from the manifest (corrupted or refitted)")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise KavaError(f"basis {path}: not a readable safetensors file ({err})") from None
    meta = handle.metadata() or {}
    for key, value in {"format": BASIS_FORMAT, **expected}.items():
        if meta.get(key) != value:
            raise KavaError(f"basis {path}: metadata {key} is {meta.get(key)!r}, expected {value!r}")
    tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    channels = int(np.prod(json.loads(meta["kv_shape"])))
    for layer in json.loads(meta["layers"]):
        for kind in KINDS:
            mean, basis = tensors.get(f"mean_{kind}.{layer}"), tensors.get(f"basis_{kind}.{layer}")
            if (mean is None or basis is None or tuple(mean.shape) != (channels,)
                    or basis.dim() != 2 or basis.shape[1] != channels or basis.shape[0] < 1):
                raise KavaError(f"basis {path}: mean_{kind}.{layer} / basis_{kind}.{layer} missing "
                                f"or not [{channels}] / [rank, {channels}]")
    return tensors


def basis_ranks(basis):
    """{"k.<l>": components, ...} of a basis file's tensors."""
    return {name.removeprefix("basis_"): tensor.shape[0] for name, tensor in basis.items()
            if name.startswith("basis_")}


def build_manifest(card, data_info, split, shard_infos, manifest_path):
    """The manifest of one teacher x split from its shards' sidecars, checked for agreement
    with each other and for covering every row of the split exactly once."""
    if not shard_infos:
        raise KavaError(f"{manifest_path}: no shards to list")
    shared = ("dtype", "key_space", "compute_dtype", "layers", "kv_shape", "tokenizer",
              "max_length", "on_too_long", "logits")
    first = shard_infos[0]
    for info in shard_infos:
        differing = [key for key in (*shared, "basis") if info.get(key) != first.get(key)]
        if differing:
            raise KavaError(f"shard {info['path']}: {differing[0]} {info.get(differing[0])!r} "
                            f"differs from shard {first['path']}'s {first.get(differing[0])!r}")
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

    def relative(path):
        return path if os.path.isabs(path) else os.path.relpath(path, base)

    basis = first.get("basis")
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
        "basis": basis and {"path": relative(basis["path"]), "sha256": basis["sha256"]},
        "shards": [{"path": relative(info["path"]),
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
    zero-copy views of the memory-mapped file; fp8 and pca are dequantised to float32, each
    layer's slice in one cast-and-scale (and for pca one matmul onto the basis)."""

    def __init__(self, manifest_path, expect=None):
        self.path = Path(manifest_path)
        try:
            self.manifest = read_json(self.path)
        except (OSError, ValueError) as err:
            raise KavaError(f"manifest {self.path}: unreadable ({type(err).__name__})") from None
        shards = self.manifest.get("shards")
        if not shards:
            raise KavaError(f"manifest {self.path}: lists no shards")
        if self.manifest.get("format") != FORMAT:
            raise KavaError(f"manifest {self.path}: format {self.manifest.get('format')!r}, this "
                            f"reader reads {FORMAT}; recompute the store")
        self._check_expect(expect or {})
        self.layers = list(self.manifest["layers"])
        self.kv_shape = tuple(self.manifest["kv_shape"])
        self.dtype = self.manifest["dtype"]
        if self.dtype not in STORAGE_DTYPES:
            raise KavaError(f"manifest {self.path}: unknown storage dtype {self.dtype!r} "
                            f"(known: {', '.join(STORAGE_DTYPES)})")
        self.basis = self._basis() if self.dtype == "pca" else None
        # Absent in a manifest from before logits were stored: none.
        self.logits = self.manifest.get("logits")
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

    def _basis(self):
        entry = self.manifest.get("basis") or {}
        if "path" not in entry:
            raise KavaError(f"manifest {self.path}: a pca store without a basis entry")
        return read_basis((self.path.parent / entry["path"]).resolve(), entry["sha256"],
                          self._identity())

    def _identity(self):
        """Shard (and basis) metadata that must equal the manifest's, as stored strings."""
        return {"teacher": self.manifest["teacher"]["name"],
                "weights_sha256": self.manifest["teacher"]["weights_sha256"],
                "key_space": self.manifest["key_space"],
                "layers": json.dumps(self.manifest["layers"]),
                "kv_shape": json.dumps(self.manifest["kv_shape"])}

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
        expected = {"format": FORMAT, **self._identity(), "dtype": self.dtype,
                    "ids": json.dumps(entry["ids"])}
        if self.logits:
            expected["logits"] = json.dumps(self.logits)
        if self.dtype == "pca":
            expected["basis_sha256"] = self.manifest["basis"]["sha256"]
        for key, value in expected.items():
            if meta.get(key) != value:
                raise KavaError(f"shard {path}: metadata {key} does not match {self.path}")
        # get_tensor views the file's one memory map; slicing these views copies nothing.
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        for name in [name for name in tensors if "_exp." in name]:
            # 2**exp, once per shard: [groups, channels], a few KB.
            tensors[name.replace("_exp.", "_scale.")] = torch.exp2(tensors.pop(name).float())
        return tensors

    def example(self, i):
        """{id, input_ids [T], char_spans [T, 2], k {layer: [T, H, D]}, v {layer: [T, H, D]}},
        and with stored logits top_logp [T, k], top_ids [T, k] (int64) and tail_logp [T]."""
        if not 0 <= i < len(self.ids):
            raise IndexError(f"example {i} out of range for {len(self.ids)} examples")
        number = bisect.bisect_right(self._starts, i) - 1
        local = i - self._starts[number]
        tensors = self._shard(number)
        start, end = tensors["offsets"][local:local + 2].tolist()
        group = tensors["group"][local].item() if self.dtype in SCALED else None
        out = {"k": {}, "v": {}}
        for layer in self.layers:
            for kind in KINDS:
                values = tensors[f"{kind}.{layer}"][start:end]
                if group is not None:
                    values = values.float().mul_(tensors[f"{kind}_scale.{layer}"][group])
                if self.dtype == "pca":
                    values = torch.addmm(self.basis[f"mean_{kind}.{layer}"], values,
                                         self.basis[f"basis_{kind}.{layer}"]).view(-1, *self.kv_shape)
                out[kind][layer] = values
        if self.logits:
            out.update({name: tensors[name][start:end] for name in LOGIT_TENSORS})
            out["top_ids"] = out["top_ids"].long()
        return {"id": self.ids[i], "input_ids": tensors["input_ids"][start:end].long(),
                "char_spans": tensors["char_spans"][start:end].long(), **out}


def open_teacher_store(manifest, teacher, weights_sha256, **expect):
    """The one way to open a teacher's KV store: the KVStore of `manifest`, refused (naming the manifest) unless it holds the KV of
    `teacher` computed with the weights `weights_sha256` (None: a teacher whose weights the
    caller cannot name, e.g. one a student did not learn from, is not held to any) and meets any
    further KVStore expectation (e.g. key_space)."""
    expect = {"teacher": teacher, **expect}
    if weights_sha256 is not None:
        expect["weights_sha256"] = weights_sha256
    return KVStore(manifest, expect=expect)
