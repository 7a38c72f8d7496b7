"""What reading holds between two requests, in one place: the TensorStore context (connection and
concurrency pools, and the credentials it was made from), the opened kvstores, the OCDBT b-trees
read whole, the shared zarr metadata templates, and the thread pool of byte-range reads.

Each command of the command line closes it when it ends (:meth:`Session.close`), and so does
:meth:`paramscope.api.Checkpoint.close`; what is needed after that is made again. The other
caches of paramscope are pure memos of immutable inputs (a dtype name's numpy dtype, a zarr
metadata's parse): their key is the whole input and they are never stale.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAX_STORES = 64  # opened kvstores kept at once (all let go past it)


class Session:
    """The state of reading, with what each part keys on and when it is let go.

    - ``context()``: TensorStore's context, keyed by the environment variables it is made from
      (``key`` given by :mod:`~paramscope.io.storage`: credentials, endpoints, concurrency); a
      change of any makes a new one, and everything opened with the old one is let go.
    - ``stores``: opened kvstores, by their JSON spec, each with the context it was opened in
      (one from another context is opened again); at most :data:`MAX_STORES`.
    - ``btrees``: OCDBT b-trees read whole (:mod:`~paramscope.io.btree`), by the JSON spec of
      their kvstore, the most recent last; read again when the manifest names another root (a
      new save), the oldest let go past ``btree.CACHE_BYTES``.
    - ``templates``: zarr metadata templates (metadata less shape and chunks), by their text:
      arrays of one template share one string.
    - ``pool()``: the threads that read byte ranges of raw-bytes arrays.
    """

    def __init__(self) -> None:
        self._context: tuple[tuple, Any] | None = None
        self.stores: dict[str, tuple[Any, Any]] = {}
        self.btrees: dict[str, Any] = {}
        self.templates: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None

    def context(self, key: tuple, make) -> Any:
        """The TensorStore context made by ``make()`` for the environment ``key``."""
        if self._context is None or self._context[0] != key:
            if self._context is not None:
                self._let_go()
            self._context = (key, make())
        return self._context[1]

    def kvstore(self, spec: str, context) -> Any:
        """The kvstore of JSON ``spec``, opened in ``context`` once."""
        cached = self.stores.get(spec)
        if cached is None or cached[0] is not context:
            import tensorstore as ts

            if len(self.stores) >= MAX_STORES:
                self.stores.clear()
            cached = self.stores[spec] = (
                context,
                ts.KvStore.open(json.loads(spec), context=context).result(),
            )
        return cached[1]

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="paramscope-read")
        return self._pool

    def _let_go(self) -> None:
        for tree in self.btrees.values():
            tree.drop()
        self.btrees.clear()
        self.stores.clear()
        self.templates.clear()

    def close(self) -> None:
        """Lets go of everything: the next read opens what it needs anew."""
        self._let_go()
        self._context = None
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)


SESSION = Session()  # the reading state of this process
