"""Long Range Arena data: official readers, offline generators / stand-ins, and batching.

`load_task(name, data_dir=None, **options)` is the uniform entry point: `data_dir=None` builds
the task offline (generators for ListOps, Pathfinder, Path-X, Text, Retrieval; scikit-learn
digits for Image) and a path reads the official data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .batching import (
    Batch,
    Split,
    TaskData,
    batch_order,
    iterate_batches,
    iterate_forever,
    load_split,
    num_batches,
    pad_sequences,
    save_split,
)
from .image import load_cifar10, make_digits_task, read_cifar_batch
from .listops import (
    LISTOPS_VOCAB,
    ListOpsConfig,
    evaluate_listops,
    generate_listops,
    listops_to_source,
    load_listops,
    make_listops_task,
    read_listops_tsv,
    write_listops_tsv,
)
from .pathfinder import (
    DIFFICULTIES,
    PathfinderConfig,
    PathfinderMetadata,
    generate_pathfinder,
    load_pathfinder,
    make_pathfinder_task,
    read_pathfinder_metadata,
)
from .retrieval import (
    SyntheticRetrievalConfig,
    generate_retrieval,
    load_aan,
    make_retrieval_task,
    read_aan_tsv,
)
from .text import SyntheticTextConfig, encode_bytes, generate_text, load_imdb, make_text_task

__all__ = [
    "DIFFICULTIES",
    "LISTOPS_VOCAB",
    "TASK_NAMES",
    "Batch",
    "ListOpsConfig",
    "PathfinderConfig",
    "PathfinderMetadata",
    "Split",
    "SyntheticRetrievalConfig",
    "SyntheticTextConfig",
    "TaskData",
    "batch_order",
    "encode_bytes",
    "evaluate_listops",
    "generate_listops",
    "generate_pathfinder",
    "generate_retrieval",
    "generate_text",
    "iterate_batches",
    "iterate_forever",
    "listops_to_source",
    "load_aan",
    "load_cifar10",
    "load_imdb",
    "load_listops",
    "load_pathfinder",
    "load_split",
    "load_task",
    "make_digits_task",
    "make_listops_task",
    "make_pathfinder_task",
    "make_retrieval_task",
    "make_text_task",
    "num_batches",
    "pad_sequences",
    "read_aan_tsv",
    "read_cifar_batch",
    "read_listops_tsv",
    "read_pathfinder_metadata",
    "save_split",
    "write_listops_tsv",
]

TASK_NAMES = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
"""The names `load_task` accepts, one per LRA task."""


def _config(cls: type, options: dict[str, Any]) -> Any:
    # Options may be a ready config object or its fields as keyword arguments.
    if "config" in options:
        cfg = options.pop("config")
        if not isinstance(cfg, cls):
            raise ValueError(f"config must be a {cls.__name__}, got {type(cfg).__name__}.")
        return dataclasses.replace(cfg, **options) if options else cfg
    return cls(**options)


def load_task(name: str, data_dir: str | Path | None = None, **options: Any) -> TaskData:
    """Load one LRA task, offline (`data_dir=None`) or from the official files.

    **Arguments:**

    - `name`: one of `listops`, `text`, `retrieval`, `image`, `pathfinder`, `pathx`.
    - `data_dir`: `None` for the offline generator / stand-in; otherwise the directory holding
      the official data (the extracted LRA release for listops/retrieval/pathfinder/pathx, the
      folder containing `aclImdb/` for text, containing `cifar-10-batches-py/` for image).
    - `options`: offline: `seed` plus the fields of the task's config (`ListOpsConfig`,
      `SyntheticTextConfig`, `SyntheticRetrievalConfig`, `PathfinderConfig`; `difficulty`
      for pathfinder/pathx) or `config=`; image stand-in: `seed`, `size`. Official:
      `max_length` (listops, text, retrieval), `difficulty`, `max_examples`, `skip_empty`
      (pathfinder, pathx), `val_fraction` (image).

    **Returns:**

    `TaskData`. Offline tasks carry distinct names (e.g. `image_digits_standin`,
    `text_synthetic`) so results are never mistaken for the official benchmark.

    **Raises:**

    `ValueError` for an unknown name or option; `FileNotFoundError` (listing the expected
    files and the data's source) if `data_dir` lacks the official files.
    """
    if name not in TASK_NAMES:
        raise ValueError(f"task name must be one of {', '.join(TASK_NAMES)}, got {name!r}.")
    opts = dict(options)
    try:
        if data_dir is not None:
            if name == "listops":
                return load_listops(data_dir, **opts)
            if name == "text":
                return load_imdb(data_dir, **opts)
            if name == "retrieval":
                return load_aan(data_dir, **opts)
            if name == "image":
                return load_cifar10(data_dir, **opts)
            return load_pathfinder(data_dir, 32 if name == "pathfinder" else 128, **opts)
        seed = int(opts.pop("seed", 0))
        if name == "listops":
            return make_listops_task(_config(ListOpsConfig, opts), seed)
        if name == "text":
            return make_text_task(_config(SyntheticTextConfig, opts), seed)
        if name == "retrieval":
            return make_retrieval_task(_config(SyntheticRetrievalConfig, opts), seed)
        if name == "image":
            return make_digits_task(seed, **opts)
        difficulty = opts.pop("difficulty", "hard")
        if "config" not in opts:
            base = PathfinderConfig() if name == "pathfinder" else PathfinderConfig.pathx()
            contour = PathfinderConfig.for_difficulty(difficulty).contour_length
            opts["config"] = dataclasses.replace(base, contour_length=contour)
        return make_pathfinder_task(_config(PathfinderConfig, opts), seed, name=name)
    except TypeError as exc:
        raise ValueError(f"load_task({name!r}): unsupported option ({exc}).") from None
