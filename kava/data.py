"""The dataset: where it comes from and which rows are usable.

Every row becomes `id, question, answer, final, prompt, text`, with prompt and text the plain
rendering (kava.prompts):

    prompt = "Question: ...\\nAnswer: "
    text   = prompt + answer                # the text every model's character offsets count on

Each model reads the row as data.prompt_format says (kava.prompts.render_rows).

`answer` is the full worked answer (GSM8K format, ending in `#### N`) and `final` is N
normalised (no `$`, no thousands commas). Ids are `<source>-<split>-<index>`, where index is
the row's position in the source split (bad rows included), so an id names the same row
whatever the subset size or `on_bad_row`.

Sources (`data.source`):
- `path`: a folder holding `train.jsonl` / `test.jsonl` (or `.parquet`), or a datasets
  `save_to_disk` folder with train and test splits;
- `hub`: `openai/gsm8k`, config `main`, through `datasets.load_dataset`;
- `synthetic`: `kava.synthetic`, seeded;
- `auto`: `data.path` or $KAVA_DATA_PATH if set, else the hub if reachable, else synthetic;
  each source passed over is recorded with the reason.

Subsets: `data.<split>_size` rows drawn by a shuffle seeded with `data.seed` (null: all rows),
written in source order. The row hash covers id, question and answer of the written rows.

Validation: `data.validation_size` rows of the source's *train* split (never its test split),
the tail of the same seeded shuffle whose head gives the train rows, so the two never share a
row, and the validation rows do not move when train_size changes. They keep their train ids
(`<source>-train-<index>`), which name the source row. Arms select their step on them.
"""

import codecs
import hashlib
import json
import random
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from kava.answers import FINAL_LINE
from kava.errors import KavaError
from kava.io import atomic_path
from kava.prompts import PROMPT_TEMPLATE, render
from kava.synthetic import generate

SPLITS = ("train", "test")
# The prepared tables: the source's splits plus the validation rows held out of its train split.
PREPARED = ("train", "validation", "test")
HUB_DATASET = ("openai/gsm8k", "main")
# Long enough for any working network; an offline machine fails at once (DNS), and without
# this check huggingface_hub spends ~25 s in retries before datasets gives up.
HUB_CONNECT_TIMEOUT_S = 5
COLUMNS = ("id", "question", "answer", "final", "prompt", "text")

BAD_ROW_REASONS = {
    "malformed_json": "malformed JSON",
    "not_an_object": "not a JSON object",
    "missing_field": "no string 'question' and 'answer'",
    "empty_question": "empty question",
    "empty_answer": "empty answer",
    "no_final_answer": "answer does not end in '#### <number>'",
}


# UTF-32's marks first: UTF-32-LE's starts with UTF-16-LE's.
FOREIGN_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


class BadRow(Exception):
    """A row that cannot be used; `reason` is a key of BAD_ROW_REASONS."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def check_row(record):
    """(question, answer, final) of a usable record, else BadRow."""
    if not isinstance(record, dict):
        raise BadRow("not_an_object")
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise BadRow("missing_field")
    if not question.strip():
        raise BadRow("empty_question")
    if not answer.strip():
        raise BadRow("empty_answer")
    match = FINAL_LINE.search(answer.rstrip())
    if match is None:
        raise BadRow("no_final_answer")
    return question, answer, match.group(1).replace("$", "").replace(",", "")


def _jsonl_records(path):
    """(culprit, record or BadRow) per non-blank line. Parsed line by line so that a malformed
    row is reported as file:line; datasets' json loader names neither and rejects the whole
    file, where on_bad_row: skip must keep the good rows. A file that is not UTF-8 is no bad
    row but a bad file: that is an error whatever on_bad_row says."""
    # Bytes, decoded line by line: a decoding error then names its line (a text stream decodes
    # ahead in blocks). CRLF needs nothing: the \r is JSON whitespace.
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1:
                bom = next((name for mark, name in FOREIGN_BOMS if raw.startswith(mark)), None)
                if bom:
                    raise KavaError(f"{path}: not UTF-8 but {bom} (it starts with a {bom} byte "
                                    f"order mark); save it as UTF-8")
                # Windows editors start UTF-8 files with a byte order mark.
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise KavaError(f"{path}:{line_no}: not UTF-8 (byte 0x{raw[err.start]:02x}, "
                                f"byte {err.start + 1} of the line: latin-1 or cp1252?); "
                                f"save it as UTF-8") from None
            if "\x00" in line:
                raise KavaError(f"{path}:{line_no}: not UTF-8 (NUL bytes: UTF-16 or UTF-32 "
                                f"without a byte order mark?); save it as UTF-8")
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{path}:{line_no}", BadRow("malformed_json", f" ({err.msg}, column {err.colno})")


def _table_records(rows, label):
    for index, record in enumerate(rows):
        yield f"{label} row {index}", record


def _parquet_records(path):
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise KavaError(f"{path}: not a readable parquet file ({type(err).__name__})") from None
    return _table_records(table.to_pylist(), str(path))


def _folder_splits(folder):
    """{split: records} of a folder of split files or of a save_to_disk DatasetDict."""
    if (folder / "dataset_dict.json").is_file():
        import datasets  # slow to import; only these two sources need it

        dataset = datasets.load_from_disk(str(folder))
        missing = [split for split in SPLITS if split not in dataset]
        if missing:
            raise KavaError(f"data.path {folder}: save_to_disk folder lacks split(s) "
                            f"{missing} (has {list(dataset)})")
        return {split: _table_records(dataset[split], f"{folder}[{split}]") for split in SPLITS}
    splits = {}
    for split in SPLITS:
        found = [folder / f"{split}.{ext}" for ext in ("jsonl", "parquet")
                 if (folder / f"{split}.{ext}").is_file()]
        if len(found) != 1:
            raise KavaError(f"data.path {folder}: needs exactly one of {split}.jsonl or "
                            f"{split}.parquet (found {[p.name for p in found] or 'neither'}), "
                            f"or a datasets save_to_disk folder")
        reader = _jsonl_records if found[0].suffix == ".jsonl" else _parquet_records
        splits[split] = reader(found[0])
    return splits


def _hub_unreachable():
    """Why the hub cannot be used right now, or None. With HF_HUB_OFFLINE set, datasets reads
    its local cache, so that is left to it."""
    from huggingface_hub import constants  # read at call time: tests and users may repoint it

    if constants.HF_HUB_OFFLINE:
        return None
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return f"{constants.ENDPOINT} unreachable ({err.strerror or type(err).__name__})"
    return None


def _hub_splits():
    import datasets  # see _folder_splits

    reason = _hub_unreachable()
    if reason:
        raise KavaError(f"hub {HUB_DATASET[0]}: {reason}")
    try:
        dataset = datasets.load_dataset(*HUB_DATASET)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KavaError(f"hub {HUB_DATASET[0]}: {first_line}") from None
    return {split: _table_records(dataset[split], f"{HUB_DATASET[0]}[{split}]")
            for split in SPLITS}


def _synthetic_splits(config):
    sizes = {split: config[f"{split}_size"] for split in SPLITS}
    unsized = [split for split, size in sizes.items() if size is None]
    if unsized:
        raise KavaError(f"data.{unsized[0]}_size: the synthetic generator needs a number of rows "
                        f"(null means 'all rows' of a dataset, which a generator does not have)")
    # The validation rows come out of the generated train split, as they come out of GSM8K's.
    train = generate(sizes["train"] + config["validation_size"], config["seed"], "train")
    # Test questions never repeat a train question: no contamination by construction.
    test = generate(sizes["test"], config["seed"], "test", exclude={r["question"] for r in train})
    return {"train": _table_records(train, "synthetic[train]"),
            "test": _table_records(test, "synthetic[test]")}


def _id_prefix(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "data"


def load_source(config, env_path=None):
    """Resolve `data.source`: (provenance dict, {split: iterator of (culprit, record)})."""
    source, path = config["source"], config.get("path") or env_path
    tried = []
    if source in ("auto", "path"):
        if path:
            folder = Path(path)
            if not folder.is_dir():
                raise KavaError(f"data.path {folder}: not a folder (give a folder with "
                                f"train/test jsonl or parquet files, or a save_to_disk folder)")
            return ({"source": "path", "path": str(folder.resolve()), "tried": tried,
                     "prefix": _id_prefix(folder.resolve().name)}, _folder_splits(folder))
        if source == "path":
            raise KavaError("data.source is 'path' but neither data.path nor $KAVA_DATA_PATH is set")
        tried.append("path: neither data.path nor $KAVA_DATA_PATH is set")
    if source in ("auto", "hub"):
        try:
            splits = _hub_splits()
            return {"source": "hub", "path": HUB_DATASET[0], "tried": tried, "prefix": "gsm8k"}, splits
        except KavaError as err:
            if source == "hub":
                raise KavaError(f"data.source hub: {err}") from None
            tried.append(str(err))
    return ({"source": "synthetic", "path": None, "tried": tried, "prefix": "synthetic"},
            _synthetic_splits(config))


def rows_sha256(rows):
    """Hash of the rows' identity and content (id, question, answer), canonical JSON per row."""
    digest = hashlib.sha256()
    for row in rows:
        record = {key: row[key] for key in ("id", "question", "answer")}
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def usable_rows(records, split, prefix, on_bad_row):
    """Validated rows of one split (all columns) and the skipped rows' culprits by reason."""
    rows, skipped = [], {}
    for index, (culprit, record) in enumerate(records):
        try:
            if isinstance(record, BadRow):
                raise record
            question, answer, final = check_row(record)
        except BadRow as bad:
            if on_bad_row == "error":
                raise KavaError(f"{culprit}: {BAD_ROW_REASONS[bad.reason]}{bad.detail} "
                                f"(data.on_bad_row: skip counts and skips such rows)") from None
            skipped.setdefault(bad.reason, []).append(culprit)
            continue
        rows.append({"id": f"{prefix}-{split}-{index:05d}", "question": question,
                     "answer": answer, "final": final,
                     "prompt": render(None, question, None, "plain", None).text,
                     "text": render(None, question, answer, "plain", None).text})
    return rows, skipped


def subset(rows, size, seed):
    """`size` rows drawn by a seeded shuffle, kept in source order (all rows if size is None)."""
    if size is None or size >= len(rows):
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:size])]


def hold_out(rows, train_size, validation_size, seed):
    """(train rows, validation rows) of a source's train split: one shuffle seeded with `seed`,
    validation its last `validation_size` rows, train the first `train_size` of the rest (all
    of the rest if None), each kept in source order. With validation_size 0 the train rows are
    subset()'s."""
    if validation_size >= len(rows):
        raise KavaError(f"data.validation_size {validation_size}: the train split has only "
                        f"{len(rows)} usable rows, and training needs at least one of them")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rest = len(rows) - validation_size
    train = order[:rest if train_size is None else min(train_size, rest)]
    return [rows[i] for i in sorted(train)], [rows[i] for i in sorted(order[rest:])]


def _split_record(chosen, requested, available, skipped):
    return {"rows": len(chosen), "requested": requested, "available": available,
            "sha256": rows_sha256(chosen),
            "skipped": {reason: len(culprits) for reason, culprits in skipped.items()},
            "skipped_rows": skipped}


def prepare(config, env_path=None):
    """({split: rows} of PREPARED, provenance record for data.json) for the `data` config section."""
    provenance, records = load_source(config, env_path)
    prefix = provenance.pop("prefix")
    tables, splits = {}, {}
    for split in SPLITS:
        rows, skipped = usable_rows(records[split], split, prefix, config["on_bad_row"])
        if not rows:
            where = provenance["path"] or provenance["source"]
            raise KavaError(f"data {where}: split '{split}' has no usable rows "
                            f"({sum(map(len, skipped.values()))} skipped as bad)")
        if split == "train":
            tables["train"], tables["validation"] = hold_out(
                rows, config["train_size"], config["validation_size"], config["seed"])
            # Its source rows are the train split's, whose skipped rows are counted there.
            splits["validation"] = {**_split_record(tables["validation"],
                                                    config["validation_size"], len(rows), {}),
                                    "from": "train"}
        else:
            tables[split] = subset(rows, config[f"{split}_size"], config["seed"])
        splits[split] = _split_record(tables[split], config[f"{split}_size"], len(rows), skipped)
    return tables, {**provenance, "template": PROMPT_TEMPLATE, "seed": config["seed"],
                    "on_bad_row": config["on_bad_row"],
                    "splits": {split: splits[split] for split in PREPARED}}


def write_split(rows, path):
    schema = pa.schema([(column, pa.string()) for column in COLUMNS])
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_split(path, columns=COLUMNS, start=0, stop=None):
    """Rows [start, stop) of a prepared split as dicts of the given columns."""
    # A split is one file: ParquetFile reads it without pyarrow.dataset, whose import alone
    # (pq.read_table's path handling) was 0.2 s of every stage's start.
    table = pq.ParquetFile(path).read(columns=list(columns))
    stop = table.num_rows if stop is None else min(stop, table.num_rows)
    if not 0 <= start < stop:
        raise KavaError(f"{path}: rows [{start}, {stop}) are outside its {table.num_rows} rows")
    return table.slice(start, stop - start).to_pylist()
