"""The shells: the I/O around the pure core (threads or asyncio, connections, callbacks).

``_async.py`` is written by hand; ``_sync.py`` is generated from it by ``scripts/unasync.py``
(never edit it). Where threads and asyncio really differ, the two share an interface:
``_concurrency/_async.py`` and ``_concurrency/_sync.py`` (the generator swaps one for the
other).
"""
