"""``pagefusion estimate --scheduler``: the estimate's reading and hashing on a Dask cluster.

Each source is read and hashed by one task on a worker (``scan_source``:
the worker opens the source, so the files must be where that worker can
read them), which keeps only the sorted hashes of the source's non-zero
pages. The per-source results are merged pairwise in a tree reduction
(``merge_partials``: a linear merge of sorted runs, machines kept in SPEC
order), and the root's worker replays ingest on the merged runs and returns
only the figures. The merged runs are the same bytes a local estimate
builds, so the figures are the same too.

Needs the ``fleet`` extra (``pip install 'pagefusion[fleet]'``) here and on
the workers, with pagefusion importable there.
"""

from __future__ import annotations

import secrets
import sys
import uuid
from collections.abc import Sequence
from typing import IO, Any

from pagefusion.clients.estimate import (
    EstimateError,
    MachineSpec,
    Options,
    Partial,
    evaluate,
    merge_partials,
    scan_source,
)

#: Seconds to wait for the scheduler to answer.
CONNECT_TIMEOUT = 30


def _evaluate_root(root: Partial, options: Options) -> dict[str, Any]:
    return evaluate([root], options)


def estimate_on_cluster(
    specs: Sequence[MachineSpec],
    scheduler: str,
    options: Options | None = None,
    *,
    seed: int | None = None,
    progress_stream: IO[str] | None = None,
) -> dict[str, Any]:
    """The estimate of :func:`pagefusion.clients.estimate.estimate`, computed on a cluster.

    Raises:
        EstimateError: Dask is missing, the scheduler cannot be reached, or a
            task failed (the message says which machine when it knows).
    """
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise EstimateError(
            "--scheduler needs Dask distributed: pip install 'pagefusion[fleet]'"
        ) from None
    options = options or Options()
    seed = secrets.randbits(32) if seed is None else seed
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        raise EstimateError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from None
    run = uuid.uuid4().hex[:8]
    stream = progress_stream if progress_stream is not None else sys.stderr
    show = bool(getattr(stream, "isatty", lambda: False)())
    with client:
        scans = [
            client.submit(scan_source, spec, seed, key=f"pagefusion-scan-{run}-{i}", pure=False)
            for i, spec in enumerate(specs)
        ]
        level = list(scans)
        depth = 0
        while len(level) > 1:
            merged = []
            for j in range(0, len(level) - 1, 2):
                merged.append(client.submit(
                    merge_partials, level[j], level[j + 1],
                    key=f"pagefusion-merge-{run}-{depth}-{j // 2}", pure=False))
            if len(level) % 2:
                merged.append(level[-1])
            level = merged
            depth += 1
        root = client.submit(_evaluate_root, level[0], options, key=f"pagefusion-figures-{run}",
                             pure=False)
        try:
            for done, future in enumerate(as_completed(scans), start=1):
                if future.status == "error":
                    future.result()  # raises the task's error
                if show:
                    stream.write(f"\rsources read: {done}/{len(scans)}")
                    stream.flush()
            if show:
                stream.write("\n")
                stream.flush()
            return dict(root.result())
        except EstimateError:
            raise
        except Exception as exc:  # a worker died, a task failed for another reason
            raise EstimateError(
                f"the Dask cluster at {scheduler!r} failed the estimate: "
                f"{type(exc).__name__}: {exc}"
            ) from None
