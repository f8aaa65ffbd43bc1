"""Where threads and asyncio differ, one interface: ``_async`` (asyncio) and ``_sync``
(threads) define the same names, so the sync shell is the async one with ``await`` removed."""
