"""A data file's records as the data checks read them: a .jsonl/.json file line by line or whole, a .parquet file
by its first row batch; of a file larger than ``LARGE_FILE_BYTES`` only the first ``SAMPLE_RECORDS`` are parsed and
the rest counted. A line that is not JSON or not UTF-8, or a file that cannot be read, is one message naming it."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_launch.frontend.preflight.findings import one_line

SAMPLE_RECORDS = 10_000  # records parsed of a file larger than LARGE_FILE_BYTES; the rest are counted
LARGE_FILE_BYTES = 64 * 1024 * 1024


def file_records(file: Path):
    """(where, record, problem) of each record; where is None for records only counted, not parsed. A file that
    cannot be read as text or as parquet is one problem, after the records read before it."""
    try:
        if file.suffix == ".parquet":
            yield from _parquet_records(file)
        else:
            yield from _json_records(file)
    except OSError as exc:
        yield None, None, f"{file}: cannot read it ({exc.strerror or exc}); expected a readable prompt file"


def _parquet_records(file: Path):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file)
        rows = next(table.iter_batches(batch_size=SAMPLE_RECORDS), None)
    except pyarrow.ArrowException as exc:  # ArrowInvalid for a file that is not parquet, others for a damaged one
        yield None, None, f"{file}: not a parquet file ({one_line(exc)}); expected a .parquet table of records"
        return
    records = rows.to_pylist() if rows is not None else []
    for index, record in enumerate(records):
        yield f"{file}, row {index}", record, None
    for _ in range(table.metadata.num_rows - len(records)):
        yield None, None, None


def _json_records(file: Path):
    large = file.stat().st_size > LARGE_FILE_BYTES
    if file.suffix == ".json" and not large:
        try:
            document = json.loads(file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield None, None, _not_utf8(file, exc)
            return
        except json.JSONDecodeError:
            pass  # often JSON lines under a .json name
        else:
            for index, record in enumerate(document if isinstance(document, list) else [document]):
                yield f"{file}, record {index}", record, None
            return
    parsed = 0
    with open(file, "rb") as f:  # bytes: a line that is not UTF-8 is reported by its number
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()  # stripped: json's position of an error then ignores the newline
            except UnicodeDecodeError as exc:
                yield None, None, _not_utf8(file, exc, number)
                return
            if not line:
                continue
            if large and parsed >= SAMPLE_RECORDS:
                yield None, None, None
                continue
            parsed += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield None, None, f"{file}, line {number}: invalid JSON ({err}); expected one JSON record per line"
                continue
            yield f"{file}, line {number}", record, None


def _not_utf8(file: Path, exc: UnicodeDecodeError, line: int | None = None) -> str:
    where = f"{file}, line {line}" if line else str(file)
    return (f"{where}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}{' of the line' if line else ''}); "
            "expected UTF-8 text; convert it, e.g. with iconv -f ENCODING -t utf-8")
