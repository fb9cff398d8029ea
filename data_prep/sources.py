"""Document sources: each yields strings (one per document) in a deterministic order.

    builtin:python-docs   CPython's own docstrings (one document per stdlib module) and the
                          pydoc topics (one per topic): ~1.7 MB of real English, fully offline
    files:<glob>          .txt (a file is a document), .jsonl (a line's text field), .parquet;
                          .txt and .jsonl may be compressed (.gz, .zst)
    hf:<name>[:<config>]  a Hugging Face dataset through `datasets.load_dataset`, streamed; HFOptions
                          add its split, data_files, data_dir and revision (a file-format builder
                          such as hf:parquet or hf:json needs data_files or data_dir)
    hf-disk:<path>        a dataset written by `datasets.Dataset(Dict).save_to_disk` (load_from_disk)

A source is checked (files matched, dataset opened) when `documents` is called, before any document
is read; reading errors name the file and line.
"""
import contextlib
import glob
import gzip
import importlib
import inspect
import io
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import warnings
from typing import Iterator, NamedTuple

# Never imported: side effects (antigravity opens a browser, this prints, lib2to3 writes grammar
# caches), GUIs (idlelib, tkinter, turtle), the test suite (slow, huge), generated boilerplate
# (encodings' codec tables), and pydoc_data, which is read directly.
SKIP_MODULES = {"antigravity", "this", "lib2to3", "idlelib", "tkinter", "turtle", "turtledemo",
                "test", "tests", "idle_test", "ensurepip", "encodings", "pydoc_data"}
# `datasets`' builders that read files of one format: without data_files / data_dir they would
# read the working directory.
FILE_BUILDERS = {"arrow", "csv", "json", "pandas", "parquet", "text", "webdataset"}


class HFOptions(NamedTuple):
    split: str = "train"
    data_files: list | None = None  # globs
    data_dir: str | None = None
    revision: str | None = None


def documents(source: str, text_field: str = "text", hf: HFOptions = HFOptions()) -> Iterator[str]:
    """The non-empty documents of `source` (see the module docstring for the forms)."""
    kind, _, arg = source.partition(":")
    if kind != "hf" and (hf.data_files or hf.data_dir or hf.revision):
        raise ValueError(f"--source {source}: --hf-data-files, --hf-data-dir and --hf-revision apply only "
                         f"to hf: sources")
    if kind == "builtin" and arg == "python-docs":
        docs = python_docs()
    elif kind == "files" and arg:
        docs = file_documents(arg, text_field)
    elif kind == "hf" and arg:
        name, _, config = arg.partition(":")
        docs = hf_documents(name, config or None, hf, text_field)
    elif kind == "hf-disk" and arg:
        docs = hf_disk_documents(arg, hf.split, text_field)
    else:
        raise ValueError(f"--source {source!r}: expected builtin:python-docs, files:<glob> or "
                         f"hf:<name>[:<config>] (a Hugging Face dataset; hf-disk:<path> for one saved "
                         f"with save_to_disk)")
    return (d for d in docs if d.strip())


def python_docs() -> list[str]:
    """One document per importable stdlib module (its docstring, then those of the classes,
    functions and methods it defines), then one per pydoc topic; sorted by name.

    Collected in a fresh interpreter: importing the whole stdlib has side effects that stay out of
    the caller, and the caller's own imports must not change the corpus (torch, for one, replaces
    inspect.getfile, which would drop its docstring from `inspect`'s document)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "docs.json")
        proc = subprocess.run([sys.executable, "-m", "data_prep.sources", out],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise RuntimeError(f"collecting builtin:python-docs failed: {proc.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def _collect_python_docs() -> list[str]:
    from pydoc_data.topics import topics

    seen: set[int] = set()  # objects reachable under several names are documented once
    docs = [_module_document(m, seen) for m in _stdlib_modules()]
    return [d for d in docs if d] + [topics[key] for key in sorted(topics)]


def _stdlib_modules() -> list:
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)
    modules = []
    for name in names:
        module = _quiet_import(name)
        if module is not None:
            modules += [module] + _submodules(module)
    return modules


def _submodules(package) -> list:
    found = []
    for info in pkgutil.iter_modules(getattr(package, "__path__", None) or []):
        if info.name.startswith("_") or info.name in SKIP_MODULES:
            continue
        module = _quiet_import(f"{package.__name__}.{info.name}")
        if module is not None:
            found += [module] + _submodules(module)
    return found


def _quiet_import(name: str):
    """The module, or None where it cannot be imported here (other platforms, missing libs)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):
            return None


def _doc(obj) -> str:
    # The object's own __doc__: inspect.getdoc would repeat inherited docstrings.
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _module_document(module, seen: set) -> str:
    parts = [f"{module.__name__}\n\n{_doc(module)}"] if _doc(module) else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some modules warn on attribute access (typing.io)
        for name, obj in sorted(vars(module).items()):
            if (name.startswith("_") or id(obj) in seen or getattr(obj, "__module__", None) != module.__name__
                    or not (inspect.isclass(obj) or inspect.isroutine(obj))):
                continue
            seen.add(id(obj))
            if _doc(obj):
                parts.append(f"{module.__name__}.{name}\n\n{_doc(obj)}")
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if not attr.startswith("_") and _doc(member) and (
                            inspect.isroutine(member) or isinstance(member, (property, classmethod, staticmethod))):
                        parts.append(f"{module.__name__}.{name}.{attr}\n\n{_doc(member)}")
    return "\n\n".join(parts)


def file_documents(pattern: str, text_field: str = "text") -> Iterator[str]:
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not paths:
        raise ValueError(f"files:{pattern}: no files match")
    for path in paths:  # every file's type is checked before any is read
        _file_kind(path)
    return (doc for path in paths for doc in _file_documents(path, text_field))


COMPRESSIONS = (".gz", ".zst")


def _file_kind(path: str) -> tuple[str, str]:
    """(type, compression) from the name: ("jsonl", ".gz") for a.jsonl.gz."""
    stem, ext = os.path.splitext(path.lower())
    compression = ext if ext in COMPRESSIONS else ""
    kind = os.path.splitext(stem)[1] if compression else ext
    if kind not in (".txt", ".jsonl", ".parquet") or (compression and kind == ".parquet"):
        raise ValueError(f"{path}: unsupported file type {kind + compression!r}; expected .txt, .jsonl "
                         f"(either may end in {' or '.join(COMPRESSIONS)}) or .parquet")
    return kind[1:], compression


def _file_documents(path: str, text_field: str) -> Iterator[str]:
    kind, compression = _file_kind(path)
    if kind == "parquet":
        yield from _parquet_documents(path, text_field)
        return
    try:
        with _open_binary(path, compression) as f:
            if kind == "txt":
                yield _decode(f.read(), path, 1)
                return
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield _field(_json_line(_decode(line, path, i), path, i), text_field, f"{path}:{i}")
    except (OSError, EOFError) as e:  # a truncated or corrupt compressed file
        raise ValueError(f"{path}: cannot read it ({e})") from None


def _open_binary(path: str, compression: str):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # buffered: it reads by line
    return open(path, "rb")


def _decode(data: bytes, path: str, first_line: int) -> str:
    """UTF-8 text with universal newlines (as text-mode open() reads it); the error names the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8 "
                         f"({e.reason}); expected UTF-8 text (convert it, e.g. with iconv)") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_line(line: str, path: str, i: int):
    try:
        return json.loads(line.rstrip("\n"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}: column {e.colno}); expected one JSON "
                         f"object per line") from None


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    import pyarrow as pa

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); "
                         f"choose one with --text-field")
    kind = table.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_field!r} holds {kind}, expected strings; choose the text "
                         f"column with --text-field")
    for batch in table.iter_batches(columns=[text_field]):
        yield from (t or "" for t in batch.column(0).to_pylist())


def hf_documents(name: str, config, hf: HFOptions, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    if name in FILE_BUILDERS and not (hf.data_files or hf.data_dir):
        raise ValueError(f"hf:{name} reads files of one format: give them with --hf-data-files GLOB or "
                         f"--hf-data-dir DIR (or use files:<glob>)")
    rows = load_dataset(name, config, split=hf.split, streaming=True, data_files=hf.data_files,
                        data_dir=hf.data_dir, revision=hf.revision)
    return (_field(row, text_field, f"hf:{name} row {i}") for i, row in enumerate(rows))


def hf_disk_documents(path: str, split: str, text_field: str) -> Iterator[str]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(f"hf-disk:{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise ValueError(f"hf-disk:{path}: no split {split!r} (splits: {sorted(data)}); choose one "
                             f"with --hf-split")
        data = data[split]
    if text_field not in data.column_names:
        raise ValueError(f"hf-disk:{path}: no column {text_field!r} (columns: {data.column_names}); "
                         f"choose one with --text-field")
    rows = data.select_columns([text_field])
    return (_field(row, text_field, f"hf-disk:{path} row {i}") for i, row in enumerate(rows))


def _field(row, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: expected a string field {text_field!r} (found {keys}); "
                         f"choose the field with --text-field")
    return row[text_field]


if __name__ == "__main__":  # the fresh interpreter of python_docs()
    with open(sys.argv[1], "w") as f:
        json.dump(_collect_python_docs(), f)
