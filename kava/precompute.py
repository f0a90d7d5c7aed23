"""Run a teacher once over a shard of the data and store its per-layer K and V.

Tokenisation: the teacher's own (fast) tokenizer on `text` as the teacher reads it
(kava.prompts.render_rows), with its default special tokens and character offsets, stored on
the row's plain text (moved there by the row's `segments` under data.prompt_format chat). An example longer than `max_length` teacher tokens keeps its first
`max_length` tokens (`truncate`) or is left out (`skip`); both are counted per shard.

Batching: a shard's examples are sorted by length (longest first, ties in row order) and
packed into right-padded batches of at most `batch_tokens` padded tokens; right padding with
the attention mask leaves every real token's K and V as they would be alone. The decoder body
runs without lm_head under inference_mode.

Compute dtype: `auto` is the job's own device precision (kava.environment.compute_dtype:
bf16 on GPUs and on CPUs with AMX/AVX512-BF16, else fp32); fp32 gives exact hand-checkable
values. On CPU the result is bit-identical between runs for a given configuration.

Storage: bf16/fp16/fp32 as computed; fp8 with a power-of-two scale per forward batch and
channel; pca: the coefficients on the teacher's basis (fit_basis: per layer and kind, the
principal components of a sample of train KV that keep `variance` of its variance), in fp8
the same way.

Logits (`logits`, for a teacher some arm distils from, whatever its tokenizer: training picks
KL or ULD by it): per token the top-k next-token log-probabilities, their ids and the log of
the rest of the mass (kava.kvstore), from a full forward with lm_head. Without them the forward
stops at the last stored layer, as fast as KV alone allows.

On a GPU, each batch's K/V are copied to pinned host memory on a side stream and written into
the memory-mapped shard by a writer thread while the next batch runs.
"""

import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from kava.align import shared_spans
from kava.capture import attention_shape, decoder_layers, forward_kv, forward_kv_logits
from kava.data import rows_sha256
from kava.environment import compute_dtype, job_device
from kava.errors import KavaError
from kava.io import write_json
from kava.kvstore import (FORMAT, ID_DTYPES, KINDS, LOGIT_DTYPES, SCALED, STORAGE_DTYPES,
                          ShardWriter, basis_ranks, build_manifest, logits_layout,
                          quantize_fp8, read_basis, sha256_file, shard_layout, write_basis)
from kava.losses import with_tail
from kava.models import load_model, load_tokenizer

# Batches whose K/V are in flight (being copied or written) at once: one being written while
# the next computes. More would only hold more host memory.
IN_FLIGHT = 2


def tokenizer_identity(tokenizer, model_dir):
    """What identifies the tokenisation a shard was made with."""
    identity = {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer)}
    definition = Path(model_dir) / "tokenizer.json"
    if definition.is_file():
        identity["tokenizer_json_sha256"] = sha256_file(definition)
    return identity


def tokenize(tokenizer, rows, max_length, on_too_long, teacher="teacher"):
    """Kept examples as (row position, input_ids, char_spans on the plain text) and the ids
    truncated / skipped."""
    if not tokenizer.is_fast:
        raise KavaError(f"teacher {teacher}: tokenizer {type(tokenizer).__name__} is not a fast "
                        f"tokenizer, so it gives no character offsets")
    encoded = tokenizer([row["text"] for row in rows], return_offsets_mapping=True)
    kept, truncated, skipped = [], [], []
    for position, (row, ids, spans) in enumerate(
            zip(rows, encoded["input_ids"], encoded["offset_mapping"])):
        if len(ids) > max_length:
            if on_too_long == "skip":
                skipped.append(row["id"])
                continue
            truncated.append(row["id"])
            ids, spans = ids[:max_length], spans[:max_length]
        if row.get("segments"):
            spans = shared_spans(spans, row["segments"]).tolist()
        kept.append((position, ids, spans))
    return kept, truncated, skipped


def length_batches(lengths, batch_tokens):
    """Indices into `lengths`, longest first, in batches of at most `batch_tokens` padded tokens
    (a single example longer than that is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def pad_batch(sequences):
    """Right-padded `[B, T]` input ids and the bool mask of real tokens. The pad id is
    irrelevant: causal attention never lets a real token see a later (pad) position."""
    input_ids = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    valid = torch.zeros(input_ids.shape, dtype=torch.bool)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        valid[row, :len(ids)] = True
    return input_ids, valid


def _storage_tensors(kv, valid, dtype, basis=None):
    """{shard tensor name: batch tensor [B, T, ...], or for the exponents [channels]}."""
    out = {}
    for layer, pair in kv.items():
        for kind, x in zip(KINDS, pair):
            name = f"{kind}.{layer}"
            if dtype == "pca":
                x = torch.addmm(basis[f"shift_{kind}.{layer}"], x.flatten(2).flatten(0, 1).float(),
                                basis[f"project_{kind}.{layer}"]).view(*x.shape[:2], -1)
            if dtype in SCALED:
                out[name], out[f"{kind}_exp.{layer}"] = quantize_fp8(x, valid)
            else:
                out[name] = x.to(STORAGE_DTYPES[dtype])
    return out


def top_k_tensors(logits, spec):
    """The stored top-k of a batch's logits [B, T, V] (kava.kvstore's top_logp, top_ids,
    tail_logp, each [B, T, ...]): log-softmax in float32, then the k largest and the tail
    bucket exactly as kava.losses.kd_loss builds the student's."""
    top = logits.float().log_softmax(dim=-1).topk(spec["k"], dim=-1)
    buckets = with_tail(top.values)
    return {"top_logp": buckets[..., :-1].to(LOGIT_DTYPES[spec["dtype"]]),
            "top_ids": top.indices.to(ID_DTYPES[spec["ids"]]),
            "tail_logp": buckets[..., -1]}


def projection(basis, device):
    """The basis file's tensors as the writer applies them: coefficients = x @ project + shift
    (project = basis^T, shift = -mean @ basis^T), on the forward's device."""
    out = {}
    for name, tensor in basis.items():
        if name.startswith("basis_"):
            kind_layer = name.removeprefix("basis_")
            project = tensor.T.contiguous().to(device)
            out[f"project_{kind_layer}"] = project
            out[f"shift_{kind_layer}"] = -(basis[f"mean_{kind_layer}"].to(device) @ project)
    return out


def _to_host(tensors, copy_stream):
    """Start the device→host copy of a batch; returns host tensors and the event that marks
    the copy done (None on CPU, where the tensors already are host memory)."""
    if copy_stream is None:
        return tensors, None
    copy_stream.wait_stream(torch.cuda.current_stream())
    host = {}
    with torch.cuda.stream(copy_stream):
        for name, tensor in tensors.items():
            host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host[name].copy_(tensor, non_blocking=True)
            # The compute stream may free `tensor` before the side stream has read it.
            tensor.record_stream(copy_stream)
    event = torch.cuda.Event()
    event.record(copy_stream)
    return host, event


def _write_batch(writer, number, batch, lengths, offsets, host, event):
    if event is not None:
        event.synchronize()
    for name, tensor in host.items():
        target = writer.tensors[name]
        if "_exp." in name:
            target[number].copy_(tensor)
            continue
        for row, index in enumerate(batch):
            target[offsets[index]:offsets[index] + lengths[index]].copy_(
                tensor[row, :lengths[index]])


def precompute_shard(model, tokenizer, rows, path, *, identity, layers, key_space, dtype,
                     max_length, on_too_long, batch_tokens, basis=None, logits=None,
                     progress_label="shard"):
    """Write the shard of `rows` ({id, text}) to `path`; return its sidecar record.
    `identity`: teacher, weights_sha256, tokenizer (tokenizer_identity) and compute_dtype.
    `basis` (pca only): {"path", "sha256", "tensors"} of the teacher's basis file.
    `logits`: kava.kvstore.logits_spec to store the top-k logits too, or None."""
    kept, truncated, skipped = tokenize(tokenizer, rows, max_length, on_too_long,
                                        identity["teacher"])
    lengths = [len(ids) for _, ids, _ in kept]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    modules = decoder_layers(model)
    kv_shape = attention_shape(modules[layers[0]].self_attn)
    ids = [rows[position]["id"] for position, _, _ in kept]
    record = {**identity, "dtype": dtype, "key_space": key_space, "layers": layers,
              "kv_shape": list(kv_shape), "max_length": max_length, "on_too_long": on_too_long,
              "logits": logits}
    extra = {"format": FORMAT, "ids": ids}
    if (dtype == "pca") != (basis is not None):
        raise KavaError(f"teacher {identity['teacher']}: a basis goes with dtype pca and only "
                        f"with it (dtype {dtype})")
    if basis is not None:
        record["basis"] = {"path": str(basis["path"]), "sha256": basis["sha256"]}
        extra["basis_sha256"] = basis["sha256"]
    metadata = {key: value if isinstance(value, str) else json.dumps(value)
                for key, value in {**record, **extra}.items() if key != "basis"}
    device = next(model.parameters()).device
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    batches = length_batches(lengths, batch_tokens)
    layout = shard_layout(len(kept), offsets[-1], layers, kv_shape, dtype, len(batches),
                          basis and basis_ranks(basis["tensors"]))
    if logits:
        layout.update(logits_layout(offsets[-1], logits))
    projected = basis and projection(basis["tensors"], device)
    writer = ShardWriter(path, layout, metadata)
    writer.tensors["offsets"].copy_(torch.tensor(offsets))
    if dtype in SCALED:
        for number, batch in enumerate(batches):
            writer.tensors["group"][batch] = number
    for index, (_, token_ids, spans) in enumerate(kept):
        writer.tensors["input_ids"][offsets[index]:offsets[index + 1]] = torch.tensor(token_ids)
        writer.tensors["char_spans"][offsets[index]:offsets[index + 1]] = torch.tensor(spans)
    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        pending = deque()
        bar = stack.enter_context(tqdm(total=offsets[-1], desc=progress_label, unit="tok"))
        for number, batch in enumerate(batches):
            input_ids, valid = pad_batch([kept[index][1] for index in batch])
            with torch.inference_mode():
                inputs = (model, input_ids.to(device), valid.long().to(device), layers, key_space)
                if logits:
                    kv, batch_logits = forward_kv_logits(*inputs)
                    tensors = top_k_tensors(batch_logits, logits)
                else:
                    kv, tensors = forward_kv(*inputs), {}
                tensors.update(_storage_tensors(kv, valid.to(device), dtype, projected))
                host, event = _to_host(tensors, copy_stream)
            pending.append(pool.submit(_write_batch, writer, number, batch, lengths, offsets,
                                       host, event))
            while len(pending) >= IN_FLIGHT:
                pending.popleft().result()
            bar.update(sum(lengths[i] for i in batch))
        for future in pending:
            future.result()
    sha256 = writer.close()
    return {**record, "examples": len(kept), "tokens": offsets[-1], "ids": ids,
            "truncated": truncated, "skipped": skipped, "bytes": Path(path).stat().st_size,
            "sha256": sha256}


def load_teacher(card, compute):
    """(model on this job's device, tokenizer, identity for precompute_shard / fit_basis) of a
    teacher card, in `precompute.compute_dtype` `compute`."""
    name, dtype = compute_dtype(compute)
    model = load_model(card, dtype=dtype, device=job_device())
    tokenizer = load_tokenizer(card["dir"])
    identity = {"teacher": card["name"], "weights_sha256": card["weights_sha256"],
                "tokenizer": tokenizer_identity(tokenizer, card["dir"]), "compute_dtype": name}
    return model, tokenizer, identity


def basis_identity(teacher, weights_sha256, key_space, layers, kv_shape):
    """The metadata a basis file shares with the shards and manifest that use it (strings)."""
    return {"teacher": teacher, "weights_sha256": weights_sha256, "key_space": key_space,
            "layers": json.dumps(layers), "kv_shape": json.dumps(list(kv_shape))}


def fit_basis(model, tokenizer, rows, path, *, identity, layers, key_space, max_length,
              batch_tokens, variance):
    """Fit the pca basis on `rows` ({id, text}; truncated to max_length) and write it to `path`:
    per stored layer and kind, the mean K (or V) vector [H*D] over the rows' real tokens and
    the fewest principal components [r, H*D] that keep `variance` of the variance around it.
    Returns {"path", "sha256", "tensors", "explained": {"k.<l>": kept fraction, ...}}."""
    kept, _, _ = tokenize(tokenizer, rows, max_length, "truncate", identity["teacher"])
    device = next(model.parameters()).device
    kv_shape = attention_shape(decoder_layers(model)[layers[0]].self_attn)
    # Running sums in float64 over tokens: the covariance needs no token kept in memory.
    sums, grams, count = {}, {}, 0
    for batch in length_batches([len(ids) for _, ids, _ in kept], batch_tokens):
        input_ids, valid = pad_batch([kept[index][1] for index in batch])
        valid = valid.to(device)
        with torch.inference_mode():
            kv = forward_kv(model, input_ids.to(device), valid.long(), layers, key_space)
        count += int(valid.sum())
        for layer, pair in kv.items():
            for kind, x in zip(KINDS, pair):
                vectors = x[valid].flatten(1).double()
                name = f"{kind}.{layer}"
                sums[name] = sums.get(name, 0) + vectors.sum(0)
                grams[name] = grams.get(name, 0) + vectors.T @ vectors
    tensors, explained = {}, {}
    for name in sums:
        mean = sums[name] / count
        eigenvalues, eigenvectors = torch.linalg.eigh(grams[name] / count - torch.outer(mean, mean))
        # eigh sorts ascending; rounding can leave tiny negative variances.
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        fraction = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(torch.finfo(torch.float64).tiny)
        rank = min(int((fraction < variance).sum()) + 1, len(eigenvalues))
        tensors[f"mean_{name}"] = mean.float().cpu()
        tensors[f"basis_{name}"] = eigenvectors[:, :rank].T.float().contiguous().cpu()
        explained[name] = round(fraction[rank - 1].item(), 6)
    metadata = {**basis_identity(identity["teacher"], identity["weights_sha256"], key_space,
                                 layers, kv_shape),
                "variance": json.dumps(variance), "examples": json.dumps(len(kept)),
                "explained": json.dumps(explained)}
    sha256 = write_basis(path, tensors, metadata)
    return {"path": str(path), "sha256": sha256, "tensors": tensors, "explained": explained}


def load_basis(path, *, identity, layers, key_space, kv_shape):
    """A basis file for precompute_shard, checked against the teacher and store it serves."""
    sha256 = sha256_file(path)
    expected = basis_identity(identity["teacher"], identity["weights_sha256"], key_space, layers,
                              kv_shape)
    return {"path": str(path), "sha256": sha256, "tensors": read_basis(path, None, expected)}


def precompute_split(card, rows, folder, *, examples_per_shard, compute="fp32", layers=None,
                     split="train", basis_rows=None, variance=0.99, **options):
    """Everything the kv_basis, precompute and kv_manifest stages do for one teacher x split, in
    one process: shards (and for dtype pca the basis, fitted on `basis_rows`, default `rows`) and
    the manifest under `folder`; returns the manifest path. For benchmarks and tests; the
    pipeline runs a job per shard instead. `options`: precompute_shard's key_space, dtype,
    max_length, on_too_long and batch_tokens."""
    model, tokenizer, identity = load_teacher(card, compute)
    layers = list(range(card["num_layers"])) if layers is None else layers
    basis = None
    if options["dtype"] == "pca":
        basis_path = Path(folder) / "kv" / "basis.safetensors"
        basis_path.parent.mkdir(parents=True, exist_ok=True)
        basis = fit_basis(model, tokenizer, rows if basis_rows is None else basis_rows, basis_path,
                          identity=identity, layers=layers, key_space=options["key_space"],
                          max_length=options["max_length"], batch_tokens=options["batch_tokens"],
                          variance=variance)
    infos = []
    for number, start in enumerate(range(0, len(rows), examples_per_shard)):
        path = Path(folder) / "scratch" / f"shard-{number:05d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        part = rows[start:start + examples_per_shard]
        record = precompute_shard(model, tokenizer, part, path, identity=identity,
                                  layers=layers, basis=basis,
                                  progress_label=f"{card['name']} {split} shard {number}",
                                  **options)
        infos.append({**record, "path": str(path), "rows": [start, start + len(part)]})
    data_info = {"source": "in-process", "path": None,
                 "splits": {split: {"rows": len(rows), "sha256": rows_sha256(rows)}}}
    manifest_path = Path(folder) / "kv" / "manifest.json"
    write_json(manifest_path, build_manifest(card, data_info, split, infos, manifest_path))
    return manifest_path
