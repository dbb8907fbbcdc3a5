"""Horovod's keyspace in a job's etcd: the gloo rendezvous of each round and the elastic mark.

Under the job's extension keys (`ext/horovod/`, which the agents' watch and snapshot ignore):
    <round>/<scope>/<key>   a key of Horovod's gloo rendezvous, written by a worker of that round
    elastic                 "1" once some Horovod worker entered hvd.elastic.run
"""
from __future__ import annotations

from typing import Callable, Optional

NAME = "horovod"
ELASTIC = "elastic"


class HorovodKeys:
    """The Horovod keys of one job, on a `rendezvous.store.EtcdStore`."""

    def __init__(self, store):
        self._store = store

    def put(self, number: int, scope: str, key: str, value: bytes) -> None:
        self._store.ext_put(NAME, f"{number}/{scope}/{key}", value)

    def get(self, number: int, scope: str, key: str) -> Optional[bytes]:
        return self._store.ext_get(NAME, f"{number}/{scope}/{key}")

    def delete(self, number: int, scope: str, *keys: str) -> None:
        self._store.ext_delete(NAME, *(f"{number}/{scope}/{key}" for key in keys))

    def delete_rounds_before(self, number: int) -> None:
        """Drop the rendezvous keys of every round before `number`."""
        old = {key.split("/", 1)[0] for key in self._store.ext_keys(NAME)}
        for first in sorted(r for r in old if r.isdigit() and int(r) < number):
            self._store.ext_delete_prefix(NAME, first + "/")

    def mark_elastic(self) -> None:
        self._store.ext_put(NAME, ELASTIC, b"1")

    def is_elastic(self) -> bool:
        return self._store.ext_get(NAME, ELASTIC) is not None

    def watch(self, callback: Callable[[], None]):
        """Call `callback()` on every change of a Horovod key; the id for `cancel`."""
        return self._store.ext_watch(NAME, callback)

    def cancel(self, watch_id) -> None:
        self._store.cancel_watch(watch_id)
