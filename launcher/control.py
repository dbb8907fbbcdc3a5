"""The agent's side of the agent-to-worker control channel (local to the node).

Workers that use the in-place API (`integrations.torch`) connect to 127.0.0.1:<port> given in
ELASTIC_AGENT_ADDR and exchange the messages of `elastic.contract` (newline-delimited JSON):

    worker -> agent   Hello(local_rank, pid)                  on connect
                      Ready()                                  waiting for a round (standby)
                      Running(round)                           running in round n's world
                      Progress(steps, committed)               passed step boundaries (throttled)
                      CollectiveFailed(round, error, traceback, lost_steps)
                      CheckpointSaved(duration_s)              a checkpoint was written
    agent -> worker   RoundMessage(round, member, world)       a new round (world: its place)
                      Leave(checkpoint)                        finish at the next boundary
                                                               (and save: no node remains)

The agent only ever sends; decisions stay in the agent's loop, which drains `messages`.
"""
from __future__ import annotations

import queue
import socket
import threading
from typing import Callable, Dict, Optional

from elastic.contract import Hello, Message, decode, encode


class ControlServer:
    def __init__(self, wake: Callable[[], None]):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._wake = wake
        self._lock = threading.Lock()
        self._conns: Dict[int, socket.socket] = {}  # local rank -> connection
        # (local rank, worker pid, message): the pid lets the agent ignore a stopped worker's last words
        self.messages: "queue.Queue[tuple[int, int, Message]]" = queue.Queue()
        self._closed = False
        threading.Thread(target=self._accept, name="control-accept", daemon=True).start()

    @property
    def addr(self) -> str:
        host, port = self._sock.getsockname()
        return f"{host}:{port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), name="control-read",
                             daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        local_rank: Optional[int] = None
        pid = 0
        try:
            for line in conn.makefile("r", encoding="utf-8"):
                msg = decode(line)
                if isinstance(msg, Hello):
                    local_rank, pid = msg.local_rank, msg.pid
                    with self._lock:
                        old = self._conns.get(local_rank)
                        self._conns[local_rank] = conn
                    if old is not None and old is not conn:
                        old.close()
                if local_rank is not None:
                    self.messages.put((local_rank, pid, msg))
                    self._wake()
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                if local_rank is not None and self._conns.get(local_rank) is conn:
                    del self._conns[local_rank]
            conn.close()

    def connected(self) -> set:
        with self._lock:
            return set(self._conns)

    def send(self, local_rank: int, msg: Message) -> bool:
        data = encode(msg)
        with self._lock:
            conn = self._conns.get(local_rank)
        if conn is None:
            return False
        try:
            conn.sendall(data)
            return True
        except OSError:
            return False

    def forget(self) -> None:
        """Drop every connection (the workers were stopped; new ones will say hello)."""
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass
        while not self.messages.empty():
            self.messages.get_nowait()

    def close(self) -> None:
        self._closed = True
        self.forget()
        self._sock.close()
