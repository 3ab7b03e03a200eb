"""The HDF5 store: the only code that knows the file layout, the locks and the commit order.

- `open_read(db)` -> `StoreView` (a consistent read under the shared lock);
- `StoreWriter(db)` -> the single writer (atomic, journaled commits; see `journal`);
- `schema` holds every dataset path; `check` verifies and repairs a store.
"""

from ..errors import DiskFull, StoreDamaged, StoreError
from .reader import StoreView, open_read
from .schema import (FAILURE_NONE, FAILURE_PERMANENT, FAILURE_TRANSIENT, STATE_COMPUTED,
                     STATE_FAILED, STATE_FAILED_TRANSIENT, STATE_PENDING, STATUS_FAILED,
                     STATUS_LOST, STATUS_MISSING, STATUS_NAMES, STATUS_OK, DescriptorInfo,
                     ImageRow, ImageTable, IndexEntry, LocalInfo, ModelInfo, now_iso,
                     verify_key)
from .writer import RowUpdate, StoreWriter

__all__ = [
    "DiskFull", "StoreDamaged", "StoreError", "StoreView", "open_read", "StoreWriter",
    "RowUpdate", "ImageRow", "ImageTable", "DescriptorInfo", "LocalInfo", "ModelInfo",
    "IndexEntry", "STATUS_OK", "STATUS_FAILED", "STATUS_MISSING", "STATUS_LOST", "STATUS_NAMES",
    "FAILURE_NONE", "FAILURE_PERMANENT", "FAILURE_TRANSIENT", "STATE_PENDING", "STATE_COMPUTED",
    "STATE_FAILED", "STATE_FAILED_TRANSIENT", "now_iso", "verify_key",
]
