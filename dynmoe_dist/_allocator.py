"""Turn on PyTorch's transparent-huge-page CPU allocation before the first large tensor is made.

Why: fine-grained experts have large stacked weight gradients (128 experts of 512x1024 are 256 MB per weight), and
training makes them afresh each step (``zero_grad(set_to_none=True)``). Without huge pages every fresh 4 KiB page
costs a page fault on first write: measured on a 2-core CPU host, 131k faults and a third of the expert FFN's
backward at 128 experts, against 2.3k faults with huge pages. ``THP_MEM_ALLOC_ENABLE=1`` makes torch's CPU
allocator align allocations of 2 MiB and more to huge pages and ``madvise`` them (a PyTorch feature; it only matters
where ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` or ``always``). torch reads the variable once, at
its first large allocation, so this module sets it when dynmoe_dist is imported. A value the user set, ``0``
included, wins; ``bench`` reports which was in force.
"""

from __future__ import annotations

import os

VARIABLE = "THP_MEM_ALLOC_ENABLE"


os.environ.setdefault(VARIABLE, "1")


def huge_pages_enabled() -> bool:
    return os.environ.get(VARIABLE, "0") not in ("", "0")
