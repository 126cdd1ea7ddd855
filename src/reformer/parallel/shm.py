"""``all_to_all_single`` through shared memory, for the processes of a group on one machine.

Sequence parallelism over gloo on one machine sends every exchanged row through a loopback
TCP socket: at 2M tokens on 2 processes the split by sorted slots spent 156 s of an 840 s
step inside gloo's ``all_to_all`` (docs/benchmarks.md), about 1 GB/s. Here each process
copies what it sends into an outbox of its own, a file in ``/dev/shm`` that every process of
the group maps, and each copies what it receives straight out of the senders' outboxes: two
memory copies per row and no socket.

The processes keep step through a control block, one more shared file with a slot per
process: its call counter, its process id and what it says about its message. A process
waits for the others' counters by polling them (a short spin, then yielding the CPU for up to
10 ms, then sleeping; a group with more processes than cores sleeps at once, since a spinning
or yielding wait there holds the core that the awaited process needs: tests/parallel's
test_sequence.py beside two busy loops took 313 s so, 408 s before; a 1 ms yield took 184 s
there but about 5 s more of a 2x256K step alone), not through the group's backend: at 2x256K
tokens on this 2-core machine its two
gloo collectives per call (an all-gather of the figures, a barrier) averaged 1.8 and 1.3 ms,
5 s of a 69 s step, waiting included. With the counters that step took 63 s, and 4.4 s
of it inside the exchanges instead of 9 s. A wait notices a process that has exited (it
names it) and gives up after ``timeout`` seconds.

One call (the k-th; the counters only grow):

1. A process whose message outgrows its outbox makes a larger one (a new file, with a new
   generation number), before anything is sent.
2. It writes its outbox (generation and size), message size and split sizes into its slot,
   then its counter 2k-1, and waits until every counter is at least 2k-1. Then every slot
   holds this call's figures, and every process has finished reading the previous call's
   outboxes, so they may be overwritten. If any message is larger than ``max_bytes``, every
   process falls back to ``dist.all_to_all_single`` for this call (the decision is the same
   everywhere).
3. Each process maps the outboxes that changed, copies its message for the others into its
   own (at the offsets it has in the message; its own part goes straight to its output),
   sets its counter to 2k and waits for every counter to reach 2k: then every outbox is
   written, and mapped by every reader.
4. Each copies its parts out of the others' outboxes, and unlinks the file of an outbox it
   made in this call: every reader holds a mapping now, which outlives the name. So no file
   is left in ``/dev/shm`` between calls, whatever ends the process (the control block's
   file is unlinked as soon as every process has mapped it, when the transport is made).

The counters are plain stores and loads of aligned 8-byte words, ordered as written only
where the processor keeps stores in order (x86-64's total store order): :func:`one_machine`
says no elsewhere, so "auto" picks the collective there.

Outboxes are sized to the largest message so far (with a quarter to spare) and kept between
calls; a process's resident memory grows by its own outbox and those of the others that it
has read (touched pages of a shared mapping count for every process that touched them).
``max_bytes`` bounds that: the head exchange's whole-head messages (512 MiB at 2M tokens)
go through gloo, the split's (at most 24 MiB there) through the outboxes.

Used by :class:`reformer.parallel.sequence.SequenceParallelLM` where every process of its
group runs on this machine and the model is on the CPU (:func:`one_machine`): its exchanges
(reformer.parallel.exchange, rounds) send through the transport it made.
"""

from __future__ import annotations

import itertools
import mmap
import os
import platform
import socket
import time
import uuid
import weakref
from array import array
from pathlib import Path

import torch
import torch.distributed as dist

SHM = Path("/dev/shm")
MAX_BYTES = 64 << 20  # larger messages go through dist.all_to_all_single
PAGE = mmap.PAGESIZE
TIMEOUT = 1800.0  # seconds a process waits for the others (gloo's default)
ORDERED_STORES = ("x86_64", "amd64", "i386", "i686")  # platform.machine(), lower case


def _machine_id() -> str:
    """This machine and boot: processes that share /dev/shm give the same string."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return socket.gethostname() + ":" + (boot.read_text().strip() if boot.exists() else "")


def one_machine(group: dist.ProcessGroup | None, usable: bool = True) -> bool:
    """Whether every process of ``group`` runs on this machine, with a /dev/shm to share and
    a processor that keeps stores in order, and says it can use it (``usable``): the same
    answer everywhere (a collective: every process of the group must call it)."""
    fit = (usable and SHM.is_dir() and os.access(SHM, os.W_OK)
           and platform.machine().lower() in ORDERED_STORES)
    here = _machine_id() if fit else None
    every: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, here, group=group)
    return all(m is not None and m == every[0] for m in every)


class _Mapped:
    """A file of /dev/shm mapped into this process, as a uint8 tensor (``bytes``)."""

    def __init__(self, path: Path, size: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            if create:  # nothing left behind
                _unlink(path)
            raise
        finally:
            os.close(fd)
        self.path, self.size = path, size
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def words(self) -> memoryview:
        """The mapping as int64 words (aligned 8-byte loads and stores)."""
        return memoryview(self._map).cast("q")

    def close(self) -> None:
        self.bytes = None  # the tensor exports the mapping's buffer: drop it first
        try:
            self._map.close()
        except BufferError:  # a view of it is still alive somewhere: the GC unmaps it later
            pass


def _unlink(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` is running (an exited one that is not reaped yet is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"


class _Control:
    """The group's control block: a slot of int64 words per process, ``[counter, pid,
    generation, outbox size, message bytes, split sizes...]``, each written only by its
    process (the counter last)."""

    SPINS = 2000  # polls before yielding the CPU (none where the group outnumbers the cores)
    YIELD_S = 0.01  # then yield for this long, then sleep
    NAP_S = 1e-3  # the longest sleep between polls
    CHECK_S = 1.0  # how often a sleeping wait asks whether the others are alive

    def __init__(self, path: Path, world: int, rank: int, create: bool,
                 timeout: float) -> None:
        self.width = -(-(5 + world) // 16) * 16  # whole 128-byte lines per slot
        self.world, self.rank, self.timeout = world, rank, timeout
        # More processes than cores: a spinning wait holds the core the awaited one needs.
        self.crowded = world > len(os.sched_getaffinity(0))
        self.box = _Mapped(path, max(PAGE, 8 * self.width * world), create)
        try:
            self.words = self.box.words()
            self.table = self.box.bytes.view(torch.int64)[:world * self.width].view(world, -1)
            self.words[rank * self.width + 1] = os.getpid()
        except BaseException:
            self.box.close()
            if create:
                _unlink(path)
            raise

    def post(self, values: list[int], counter: int) -> None:
        """Write my slot's figures, then my counter."""
        at = self.rank * self.width
        self.words[at + 2:at + 2 + len(values)] = array("q", values)
        self.words[at] = counter

    def figures(self, n: int) -> list[list[int]]:
        """Every slot's first ``n`` figures."""
        return self.table[:, 2:2 + n].tolist()

    def wait(self, counter: int) -> None:
        """Until every process's counter is at least ``counter``."""
        words = self.words
        for p in range(self.world):
            at = p * self.width
            if p != self.rank and words[at] < counter:
                for _ in range(0 if self.crowded else self.SPINS):
                    if words[at] >= counter:
                        break
                else:
                    self._idle(p, at, counter)

    def _idle(self, p: int, at: int, counter: int) -> None:
        """Wait for process p's counter without holding the CPU: yield it, then sleep."""
        words = self.words
        start = time.monotonic()
        nap, check = (1e-5 if self.crowded else 0.0), start + self.CHECK_S  # crowded: sleep
        while words[at] < counter:
            if nap:
                time.sleep(nap)
                nap = min(2 * nap, self.NAP_S)
            else:
                os.sched_yield()
            now = time.monotonic()
            if not nap and now - start > self.YIELD_S:
                nap = 1e-5
            if now > check:
                check = now + self.CHECK_S
                pid = words[at + 1]
                if not _alive(pid):
                    raise RuntimeError(f"shared-memory all_to_all: process {p} of the group "
                                       f"(pid {pid}) exited before reaching step {counter}")
                if now - start > self.timeout:
                    raise RuntimeError(f"shared-memory all_to_all: process {p} of the group "
                                       f"(pid {pid}) has not reached step {counter} in "
                                       f"{self.timeout:g} s")

    def close(self) -> None:
        self.words.release()
        self.table = None
        self.box.close()


class _Boxes:
    """What a transport maps: the control block, its own outbox, the others' (rank ->
    (generation, outbox)), and the name of an outbox made in the current call (unlinked at
    its end)."""

    def __init__(self) -> None:
        self.control: _Control | None = None
        self.own: _Mapped | None = None
        self.peers: dict[int, tuple[int, _Mapped]] = {}
        self.made: Path | None = None

    def close(self) -> None:
        for box in [self.own, *(m for _, m in self.peers.values())]:
            if box is not None:
                box.close()
        if self.control is not None:
            _unlink(self.control.box.path)  # (gone already unless made and never shared)
            self.control.close()
        _unlink(self.made)
        self.control, self.own, self.peers, self.made = None, None, {}, None


class SharedMemoryAllToAll:
    """``dist.all_to_all_single`` between the processes of ``group`` through shared memory.

    Call it as ``transport(out, x, out_splits, in_splits)`` with flat contiguous CPU tensors
    of one dtype (sizes in elements, as ``dist.all_to_all_single`` takes them), in every
    process of the group. With ``rows`` (int64), the message is ``x.index_select(0, rows)``
    for a 2-D ``x``, gathered straight into the outbox (and this process's part into ``out``)
    instead of into a tensor that is then copied there. :meth:`close` (or garbage
    collection, or the interpreter's exit) unmaps the outboxes. ``timeout``: seconds a call
    waits for the other processes.
    """

    def __init__(self, group: dist.ProcessGroup | None = None,
                 max_bytes: int = MAX_BYTES, timeout: float = TIMEOUT) -> None:
        self.group, self.max_bytes = group, max_bytes
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._generations = itertools.count(1)
        self.gen = 0  # my outbox's generation (0: none yet)
        self.boxes = _Boxes()
        self._finalizer = weakref.finalize(self, self.boxes.close)
        name = [uuid.uuid4().hex if self.rank == 0 else None]  # one name for the group
        if self.rank == 0:  # the control block, made before the others learn its name
            self.prefix = f"reformer-a2a-{name[0]}"
            self.boxes.control = _Control(self._path(0, 0), self.world, 0, True, timeout)
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(name, src=src, group=group)
        self.prefix = f"reformer-a2a-{name[0]}"
        if self.rank:
            self.boxes.control = _Control(self._path(0, 0), self.world, self.rank, False,
                                          timeout)
        dist.barrier(group=group)  # mapped everywhere: the name can go
        if self.rank == 0:
            _unlink(self._path(0, 0))
        self.calls = self.fallbacks = 0

    def _path(self, rank: int, gen: int) -> Path:
        """An outbox's file (generation 0: the control block's)."""
        return SHM / f"{self.prefix}-{rank}-{gen}"

    def close(self) -> None:
        self._finalizer()

    # --------------------------------------------------------------------------- a call
    def __call__(self, out: torch.Tensor, x: torch.Tensor, out_splits: list[int],
                 in_splits: list[int], rows: torch.Tensor | None = None) -> None:
        if out.dtype != x.dtype or not (out.is_contiguous() and x.is_contiguous()):
            raise ValueError(f"shared-memory all_to_all takes contiguous tensors of one dtype, "
                             f"got {x.dtype} -> {out.dtype}")
        if x.device.type != "cpu" or out.device.type != "cpu":
            raise ValueError(f"shared-memory all_to_all takes CPU tensors, got {x.device}; "
                             "use dist.all_to_all_single for other devices")
        P, me, size = self.world, self.rank, x.element_size()
        width = 1 if rows is None else x.shape[1:].numel()
        n_in = x.numel() if rows is None else rows.numel() * width
        if len(in_splits) != P or len(out_splits) != P or sum(in_splits) != n_in \
                or sum(out_splits) != out.numel() or (rows is not None and (
                    x.dim() != 2 or any(s % width for s in in_splits))):
            raise ValueError(f"splits {in_splits} -> {out_splits} do not fit {n_in} -> "
                             f"{out.numel()} elements over {P} processes"
                             + ("" if rows is None else f" in rows of {tuple(x.shape[1:])}"))
        boxes, control = self.boxes, self.boxes.control
        self.calls += 1
        step = 2 * self.calls  # my counter goes to step - 1, then to step
        nbytes = n_in * size
        if nbytes <= self.max_bytes and (boxes.own is None or nbytes > boxes.own.size):
            self._grow(nbytes)
        control.post([self.gen, boxes.own.size if boxes.own else 0, nbytes, *in_splits],
                     step - 1)
        control.wait(step - 1)  # also: the last call is read by all
        meta = control.figures(3 + P)
        for p in range(P):  # map the others' outboxes that are new since the last call
            gen, capacity = meta[p][0], meta[p][1]
            if p != me and gen and boxes.peers.get(p, (0, None))[0] != gen:
                old = boxes.peers.pop(p, (0, None))[1]
                if old is not None:
                    old.close()
                boxes.peers[p] = (gen, _Mapped(self._path(p, gen), capacity, create=False))
        if max(row[2] for row in meta) > self.max_bytes:
            # every process's all_to_all returns after every other has entered it, so after
            # each has mapped what this call made
            self.fallbacks += 1
            message = x if rows is None else x.index_select(0, rows).view(-1)
            dist.all_to_all_single(out, message, out_splits, in_splits, group=self.group)
            self._unlink_made()
            return
        starts_in = [0, *itertools.accumulate(in_splits)]
        starts_out = [0, *itertools.accumulate(out_splits)]
        flat_out = out.view(-1).view(torch.uint8)
        for p in range(P):  # my message, at its own offsets; my part straight to my output
            a, b = starts_in[p], starts_in[p + 1]
            if b == a:
                continue
            to = (flat_out[starts_out[me] * size:starts_out[me + 1] * size] if p == me
                  else boxes.own.bytes[a * size:b * size]).view(x.dtype)
            if rows is None:
                to.copy_(x.view(-1)[a:b])
            else:
                torch.index_select(x, 0, rows[a // width:b // width],
                                   out=to.view(-1, width))
        control.post([], step)
        control.wait(step)  # every outbox written, and mapped by its readers
        for p in range(P):
            if p == me or out_splits[p] == 0:
                continue
            at = sum(meta[p][3:3 + me]) * size  # my part of p's message
            n = out_splits[p] * size
            flat_out[starts_out[p] * size:starts_out[p] * size + n].copy_(
                boxes.peers[p][1].bytes[at:at + n])
        self._unlink_made()

    def _grow(self, nbytes: int) -> None:
        """A new outbox of at least ``nbytes`` (a quarter to spare, whole pages)."""
        size = max(PAGE, -(-(nbytes + nbytes // 4) // PAGE) * PAGE)
        gen = next(self._generations)
        made = _Mapped(self._path(self.rank, gen), size, create=True)
        boxes = self.boxes
        if boxes.own is not None:
            boxes.own.close()
        _unlink(boxes.made)  # (a file made earlier in this call cannot be: one grows a call)
        boxes.own, boxes.made, self.gen = made, made.path, gen

    def _unlink_made(self) -> None:
        _unlink(self.boxes.made)
        self.boxes.made = None
