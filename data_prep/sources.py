"""Document sources: each yields strings (one per document) in a deterministic order.

    builtin:python-docs   CPython's own docstrings (one document per stdlib module) and the
                          pydoc topics (one per topic): ~1.7 MB of real English, fully offline
    files:<glob>          .txt (a file is a document), .jsonl (a line's text field), .parquet
    hf:<name>[:<config>]  a Hugging Face dataset, streamed
"""
import contextlib
import glob
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
from typing import Iterator

# Never imported: side effects (antigravity opens a browser, this prints, lib2to3 writes grammar
# caches), GUIs (idlelib, tkinter, turtle), the test suite (slow, huge), generated boilerplate
# (encodings' codec tables), and pydoc_data, which is read directly.
SKIP_MODULES = {"antigravity", "this", "lib2to3", "idlelib", "tkinter", "turtle", "turtledemo",
                "test", "tests", "idle_test", "ensurepip", "encodings", "pydoc_data"}


def documents(source: str, text_field: str = "text", hf_split: str = "train") -> Iterator[str]:
    """The non-empty documents of `source` (see the module docstring for the forms)."""
    kind, _, arg = source.partition(":")
    if kind == "builtin" and arg == "python-docs":
        docs = python_docs()
    elif kind == "files" and arg:
        docs = file_documents(arg, text_field)
    elif kind == "hf" and arg:
        name, _, config = arg.partition(":")
        docs = hf_documents(name, config or None, hf_split, text_field)
    else:
        raise ValueError(f"--source {source!r}: expected builtin:python-docs, files:<glob> or "
                         f"hf:<name>[:<config>]")
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
    for path in paths:
        ext = os.path.splitext(path)[1].lower()
        if ext == ".txt":
            with open(path, encoding="utf-8") as f:
                yield f.read()
        elif ext == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        yield _field(json.loads(line), text_field, f"{path}:{i}")
        elif ext == ".parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            if text_field not in table.schema_arrow.names:
                raise ValueError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); "
                                 f"choose one with --text-field")
            for batch in table.iter_batches(columns=[text_field]):
                yield from (t or "" for t in batch.column(0).to_pylist())
        else:
            raise ValueError(f"{path}: unsupported file type {ext!r}; expected .txt, .jsonl or .parquet")


def hf_documents(name: str, config, split: str, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    for i, row in enumerate(load_dataset(name, config, split=split, streaming=True)):
        yield _field(row, text_field, f"hf:{name} row {i}")


def _field(row, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: expected a string field {text_field!r} (found {keys}); "
                         f"choose the field with --text-field")
    return row[text_field]


if __name__ == "__main__":  # the fresh interpreter of python_docs()
    with open(sys.argv[1], "w") as f:
        json.dump(_collect_python_docs(), f)
