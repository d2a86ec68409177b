"""`missrec export-items`: a checkpoint's item vectors per table as Parquet, for serving.

Each modality's adapted vectors (and the raw ID vectors of a transductive model) go to
DIR/<table>.parquet, with DIR/export.json holding the fusion weights and the scoring formula
(`fusion.DESCRIPTION`) and DIR/config.yaml the model settings. Only rank 0 writes; every rank takes
part in the collective table lookups.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from datapipes.io import staged_dir
from datapipes.schema import DataError
from missrec_torchrec.catalogue import item_tables, item_vector_chunks
from missrec_torchrec.config import dump_config
from missrec_torchrec.model import fusion
from missrec_torchrec.score_parts import Keys
from missrec_torchrec.session import load_run, log0, open_session, process_rank


EXPORT_FILE = "export.json"


def export_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_index", pa.int64(), nullable=False),
            pa.field("item_key", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("present", pa.bool_(), nullable=False),
        ]
    )


def _vector_table(lo: int, vectors: np.ndarray, present: np.ndarray, item_keys: Keys) -> pa.Table:
    n, dim = vectors.shape
    idx = np.arange(lo, lo + n, dtype=np.int64)
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    columns = [pa.array(idx), item_keys.take(idx), pa.FixedSizeListArray.from_arrays(flat, dim),
               pa.array(present.astype(bool))]
    return pa.Table.from_arrays(columns, schema=export_schema(dim))


def _fusion_record(session, files: Dict[str, str]) -> Dict[str, Any]:
    core, c = session.head.core, session.head.config
    alpha = core.fusion_alpha
    record = {
        "items": session.num_items,
        "hidden": c.hidden,
        "tables": files,
        "use_id": c.use_id,
        "fusion": c.fusion if len(core.modalities) > 1 else ("single" if core.modalities else "id_only"),
        "fusion_alpha": None if alpha is None else alpha.detach().cpu().reshape(-1).tolist(),
        "mask_missing_modality": c.mask_missing_modality,
        "temperature": c.temperature,
        "scoring": fusion.DESCRIPTION,
    }
    if session.head.repeat_bias is not None:
        # No item vector holds it: a user's score of each item of its history window is lowered by it.
        record["repeat_bias"] = float(session.head.repeat_bias.detach())
        record["scoring"] += " Then minus repeat_bias for each item in the user's history window."
    return record


def export_items(checkpoint: Path | str, out: Path | str, overwrite: bool = False,
                 overrides: Optional[List[str]] = None) -> Path:
    """`missrec export-items`: each table's item vectors (adapted modalities, raw IDs) as Parquet."""
    out = Path(out)
    step_dir, cfg = load_run(checkpoint, overrides)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: output folder exists (pass --overwrite to replace it)")
    # Only rank 0 writes; the others take part in the collective lookups.
    inputs = [step_dir, Path(cfg.data.dataset)]
    with staged_dir(out, overwrite=True, inputs=inputs) if process_rank() == 0 else nullcontext(None) as tmp:
        cfg = cfg.for_inference(tmp)
        session = open_session(cfg, step_dir)
        if session.rank == 0:  # serving reads the model settings next to the vectors
            (tmp / "config.yaml").write_text(dump_config(cfg))
        item_keys = Keys(session.info.items_path, None, "item_key")
        files = {table: f"{table}.parquet" for table in item_tables(session)}
        for table, name in files.items():
            _export_table(session, table, tmp / name if session.rank == 0 else None, item_keys)
        if session.rank == 0:
            record = {"checkpoint": str(step_dir.resolve()), **_fusion_record(session, files)}
            (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
    log0(f"wrote {out}: {', '.join(files.values())} for {session.num_items:,} items")
    return out


def _export_table(session, table: str, path: Optional[Path], item_keys: Keys) -> None:
    """One table's vectors, a row group per lookup chunk; `path` None: only join the lookups."""
    bank = session.item_bank() if table in session.head.modalities else None  # the ID table has no missing rows
    dim = session.head.config.hidden
    with pq.ParquetWriter(str(path), export_schema(dim)) if path is not None else nullcontext() as writer:
        for lo, vectors in item_vector_chunks(session, table):
            hi = lo + len(vectors)
            # Collective like the vectors' lookup: every rank, writer or not.
            present = bank.state(torch.arange(lo, hi, device=session.device)).present()[table] if bank is not None else None
            if writer is None:
                continue
            flags = present.cpu().numpy() if present is not None else np.ones(hi - lo, dtype=bool)
            writer.write_table(_vector_table(lo, vectors.cpu().numpy(), flags, item_keys))
