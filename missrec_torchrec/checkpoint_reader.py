"""DCP's file reader, less its whole-tensor transient: a saved tensor is read straight into its target.

`FileSystemReader` deserialises each saved tensor whole (`torch.load` of its file slice) and then
copies it into the tensor being loaded, so a rank holding a 1.19 GiB shard of the ID table briefly
held it twice (scoring start-up at 1e7 items peaked 1.34x the rank's bound). Where a request is a
whole saved tensor of the same dtype and contiguous layout, which is every load at an unchanged
world size, `BlockReader` reads the tensor's bytes from the torch.save archive (stored, not
compressed) into the target in blocks of `BLOCK` bytes; the archive's CRC is still checked at the
end of the entry. Anything else (a resharded load, a view, another dtype) takes DCP's own path.
"""

from __future__ import annotations

import io
import re
import zipfile
from typing import BinaryIO, List

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

BLOCK = 64 << 20
_STORAGE = re.compile(r"(^|/)data/\d+$")


class FileSlice(io.RawIOBase):
    """Bytes [offset, offset + length) of a file as a seekable file of their own. (DCP's own view
    mis-seeks from the end, which zipfile needs, and its tell is not relative to the slice.)"""

    def __init__(self, file: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self.file, self.offset, self.length, self.pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(0, base + offset), self.length)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")[: self.length - self.pos]
        self.file.seek(self.offset + self.pos)
        got = self.file.readinto(view)
        self.pos += got
        return got


class BlockReader(FileSystemReader):
    """`FileSystemReader` that reads whole saved tensors into their targets without a full copy;
    `direct` counts the requests it served so."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.direct = 0

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        rest: List[ReadItem] = []
        for req in plan.items:
            if not (req.type == LoadItemType.TENSOR and self._read_direct(req, planner)):
                rest.append(req)
        return super().read_data(LoadPlan(rest, plan.storage_data, plan.planner_data), planner)

    def _read_direct(self, req: ReadItem, planner: LoadPlanner) -> bool:
        info = self.storage_data[req.storage_index]
        if getattr(info, "transform_descriptors", None) or any(req.storage_offsets):
            return False
        target = planner.resolve_tensor(req).detach()
        if target.device.type != "cpu" or not target.is_contiguous():
            return False
        with open(self.fs.concat_path(self.path, info.relative_path), "rb") as stream:
            part = FileSlice(stream, info.offset, info.length)
            try:  # what was saved: its shape and layout (no data read), and the archive's entries
                saved = torch.load(part, map_location="meta", weights_only=True)
                part.seek(0)
                archive = zipfile.ZipFile(part)
            except Exception:  # not an archive this reader knows (an older format): DCP's own path
                return False
            with archive:
                if not (isinstance(saved, torch.Tensor) and saved.shape == target.shape and saved.dtype == target.dtype
                        and saved.is_contiguous() and saved.storage_offset() == 0):
                    return False
                entries = [e for e in archive.infolist() if _STORAGE.search(e.filename)]
                nbytes = target.numel() * target.element_size()
                if len(entries) != 1 or entries[0].compress_type != zipfile.ZIP_STORED or entries[0].file_size != nbytes:
                    return False
                into = memoryview(target.view(-1).view(torch.uint8).numpy())
                with archive.open(entries[0]) as src:
                    pos = 0
                    while pos < nbytes:
                        got = src.readinto(into[pos : pos + BLOCK])
                        if not got:
                            raise zipfile.BadZipFile(f"{info.relative_path}: a tensor ends after {pos} of {nbytes} bytes")
                        pos += got
                    src.read(1)  # at the entry's end: zipfile checks its CRC
        planner.commit_tensor(req, target)
        self.direct += 1
        return True
