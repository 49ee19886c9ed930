"""knn, reciprocal_mask and the NFormer forward over rows sharded across processes (torch.distributed).

Every rank holds a contiguous block of the N rows, in rank order (rank 0 rows [0, n_0), rank 1
the next n_1, ...; shards may be uneven or empty) and calls the same function with its own block:

    knn(x_shard, k, group)            == nk.knn(x_all, k)[my rows]            (global int64 ids)
    reciprocal_mask(idx_shard, group) == nk.reciprocal_mask(idx_all)[my rows]
    nformer_forward(model, x_shard)   == model.eval()(x_all)[my rows]        (same landmarks)

It runs on any torch.distributed process group (NCCL across GPUs and nodes, gloo on CPUs, as
started by torchrun); group=None is the default group, and without an initialised process group
(or in a world of 1) each function is the single-process op. docs/distributed.md gives the
algorithms and their costs.

knn: key blocks travel around the ring of ranks, each step's isend/irecv overlapped with the top-k
of the local queries against the block in hand, so a rank holds its own rows, its running top-k
and two key blocks, never all of X nor an N x N matrix. Neighbours are self first, then
(canonical score desc, global index asc): nk.knn's answer bit for bit, ties and near-ties
included, because the canonical score (nformer_kernels.canonical) of a pair has the same bits
wherever it is computed; the fp32 block scores (IEEE, tf32 off) only decide which pairs to score.

reciprocal_mask and the attention fetch only the rows they need from other ranks (the neighbour
lists, then per block the R-factor and v rows of the neighbours) with all_to_all_single and
variable splits, through a plan built once per neighbour graph.

Every argument is checked on every rank and the checks are compared across ranks before any
other communication: a bad argument on one rank raises its TypeError/ValueError on all of them.
traffic() counts the bytes each rank sends and receives, by kind.

Other sharded computations build on the same machinery: gather_checked (the compared argument
checks, giving a RowShards: group, rank, every rank's row count and offsets, counted collectives)
and ring_blocks (every rank's block of rows passed round the ring, the next transfer overlapped
with the work on the block in hand).
"""
import collections
import contextlib
import pickle
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from nformer_kernels import _checks, canonical, ops, torch_ops
from nformer_kernels.modules import NFormer, draw_landmarks

__all__ = ["RowShards", "gather_checked", "knn", "nformer_forward", "reciprocal_mask", "reset_traffic",
           "ring_blocks", "traffic"]

_QUERY_ROWS = 512  # query rows per score tile
_KEY_COLS = 8192  # key columns per score tile: a tile is 16 MiB of fp32
_LOOKUP_ROWS = 1 << 14  # rows per (rows, k, k) neighbour-of-neighbour block of reciprocal_mask

_SENT: collections.Counter = collections.Counter()
_RECEIVED: collections.Counter = collections.Counter()
_WAITED: collections.Counter = collections.Counter()


def traffic() -> Dict[str, Dict[str, float]]:
    """Bytes this process sent to and received from other ranks since the last reset_traffic(), and
    the seconds it spent blocked on communication: {"sent": {kind: bytes}, "received": {kind: bytes},
    "wait_s": {kind: seconds}} (a ring's wait is what its transfers did not hide behind the top-k).

    Kinds: "ring" (knn and affinity key blocks), "halo" (R and v rows, per block), "neighbours"
    (neighbour lists for reciprocal_mask), "plan" (the halo plans' row requests), "landmarks"
    (drawn positions and landmark rows), "meta" (the shard sizes and argument checks, pickled);
    callers of ring_blocks and RowShards's collectives count under the kinds they name.
    Point-to-point and all_to_all traffic is counted exactly; all_reduce at the ring algorithm's
    2(P-1)/P times the payload, all_gather at (P-1) times it.
    """
    return {name: {k: v for k, v in counter.items() if v}
            for name, counter in (("sent", _SENT), ("received", _RECEIVED), ("wait_s", _WAITED))}


def reset_traffic() -> None:
    for counter in (_SENT, _RECEIVED, _WAITED):
        counter.clear()


@contextlib.contextmanager
def _blocked(kind):
    start = time.perf_counter()
    try:
        yield
    finally:
        _WAITED[kind] += time.perf_counter() - start


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class _World:
    """The process group, this rank, and every rank's row count (shards are contiguous, in rank order)."""

    group: Optional["dist.ProcessGroup"]
    rank: int
    size: int
    counts: Tuple[int, ...]
    device: torch.device  # where collective buffers live (CUDA for NCCL)

    @property
    def offsets(self) -> List[int]:
        out = [0]
        for c in self.counts:
            out.append(out[-1] + c)
        return out

    @property
    def start(self) -> int:
        return self.offsets[self.rank]

    @property
    def rows(self) -> int:
        return self.counts[self.rank]

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def peer(self, group_rank: int) -> int:
        """The global rank of a rank of the group (what point-to-point ops address)."""
        return dist.get_global_rank(self.group or dist.group.WORLD, group_rank)

    def owners(self, ids: torch.Tensor) -> torch.Tensor:
        """The rank holding each global row id."""
        ends = torch.tensor(self.offsets[1:], dtype=torch.int64, device=ids.device)
        return torch.searchsorted(ends, ids, right=True)

    # ---------------------------------------------------------------- counted communication
    def shift(self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], kind: str):
        """Start sending `sends` to the next rank of the ring and receiving `recvs` from the
        previous one; returns the requests to wait on. Empty tensors are not sent (both sides know)."""
        nxt, prev = self.peer((self.rank + 1) % self.size), self.peer((self.rank - 1) % self.size)
        p2p = []
        for tag, t in enumerate(sends):
            if t.numel():
                p2p.append(dist.P2POp(dist.isend, t, nxt, self.group, tag))
                _SENT[kind] += _nbytes(t)
        for tag, t in enumerate(recvs):
            if t.numel():
                p2p.append(dist.P2POp(dist.irecv, t, prev, self.group, tag))
                _RECEIVED[kind] += _nbytes(t)
        return dist.batch_isend_irecv(p2p) if p2p else []

    @staticmethod
    def wait(requests, kind: str) -> None:
        with _blocked(kind):
            for request in requests:
                request.wait()

    def all_to_all(self, send: torch.Tensor, send_counts: List[int], recv_counts: List[int], kind: str):
        """Rows send[...] in rank order, send_counts[r] of them to rank r; returns the rows received,
        recv_counts[r] from rank r."""
        out = send.new_empty((sum(recv_counts), *send.shape[1:]))
        with _blocked(kind):
            dist.all_to_all_single(out, send.contiguous(), recv_counts, send_counts, group=self.group)
        row = _nbytes(send[:1]) if send.shape[0] else _nbytes(out[:1])
        _SENT[kind] += row * (sum(send_counts) - send_counts[self.rank])
        _RECEIVED[kind] += row * (sum(recv_counts) - recv_counts[self.rank])
        return out

    def all_reduce_sum(self, t: torch.Tensor, kind: str, op=None) -> torch.Tensor:
        with _blocked(kind):
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        volume = 2 * (self.size - 1) * _nbytes(t) // self.size
        _SENT[kind] += volume
        _RECEIVED[kind] += volume
        return t


    def all_reduce_max(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        return self.all_reduce_sum(t, kind, dist.ReduceOp.MAX)


def _single_process(group) -> bool:
    return group is None and not (dist.is_available() and dist.is_initialized())


def _gather_checked(group, local_check):
    """(world info, every rank's metadata) after running local_check() -> (rows, device, metadata)
    on every rank. A TypeError/ValueError on any rank is raised on every rank (prefixed with the
    rank it came from), so none is left waiting in a later collective."""
    try:
        mine, err = local_check(), None
    except (TypeError, ValueError) as exc:
        mine, err = None, exc
    if _single_process(group):
        if err is not None:
            raise err
        rows, device, meta = mine
        return _World(None, 0, 1, (rows,), device), [meta]
    not_member = ValueError("group: this process is not a member of the group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:  # what new_group() gives outsiders
            raise not_member
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise not_member
    size = dist.get_world_size(group)
    gathered = [None] * size
    payload = (mine, err)
    with _blocked("meta"):
        dist.all_gather_object(gathered, payload, group=group)
    _SENT["meta"] += len(pickle.dumps(payload)) * (size - 1)
    _RECEIVED["meta"] += sum(len(pickle.dumps(g)) for r, g in enumerate(gathered) if r != rank)
    for r, (_, e) in enumerate(gathered):
        if e is not None:
            if r == rank:
                raise e
            raise type(e)(f"on rank {r}: {e}")
    rows, device, _ = mine
    off_gpu = [r for r, g in enumerate(gathered) if g[0][1].type != "cuda"]
    if dist.get_backend(group) == "nccl" and off_gpu:
        raise ValueError(f"group: its backend is nccl, which needs CUDA tensors; ranks {off_gpu} pass "
                         f"{gathered[off_gpu[0]][0][1].type} tensors")
    return _World(group, rank, size, tuple(g[0][0] for g in gathered), device), [g[0][2] for g in gathered]


RowShards = _World  # the public name: what gather_checked returns and ring_blocks walks


def gather_checked(local_check, group=None) -> Tuple[RowShards, list]:
    """Run local_check() -> (rows, device, metadata) on every rank and compare the outcomes:
    returns (RowShards of the group with every rank's row count, [every rank's metadata] in rank
    order). A TypeError/ValueError raised by local_check on any rank is raised on every rank
    (prefixed "on rank r: " elsewhere), so no rank is left waiting in a later collective; call it
    on every rank, also after a local computation whose errors must not strand the others.
    metadata is pickled to the other ranks: keep it small (shapes, options, a few numbers).
    Without an initialised process group (group=None) it is a world of 1 and communicates nothing.
    An NCCL group with a non-CUDA device on any rank is refused on every rank."""
    return _gather_checked(group, local_check)


def ring_blocks(shards: RowShards, tensors: Sequence[torch.Tensor], kind: str = "ring"):
    """Every rank's block of rows, round the ring: yields (owner, block) for owner = rank,
    rank - 1, ... (mod size), block being the owner's `tensors` (each with the owner's row count
    as its first dim; same dtypes and trailing shapes on every rank). Before yielding a block it
    starts sending it to the next rank and receiving the next one from the previous rank
    (isend/irecv), so the transfer overlaps the caller's work on the block in hand; it waits on
    the transfer when the caller asks for the next block. The caller must not modify a yielded
    block and must draw every block on every rank (an error mid-way: keep drawing, skip the
    work, and agree on it afterwards with gather_checked). A rank holds at most two blocks.
    Bytes are counted in traffic() under `kind`."""
    block = list(tensors)
    for step in range(shards.size):
        owner = (shards.rank - step) % shards.size
        requests, arriving = [], None
        if step + 1 < shards.size:  # start passing the block on before it is worked on
            rows = shards.counts[(owner - 1) % shards.size]
            arriving = [t.new_empty((rows, *t.shape[1:])) for t in block]
            requests = shards.shift(block, arriving, kind)
        yield owner, block
        shards.wait(requests, kind)
        if arriving is not None:
            block = arriving


def _same_everywhere(metas, key, name, error=ValueError):
    values = [m[key] for m in metas]
    if any(v != values[0] for v in values):
        raise error(f"{name} must be the same on every rank, got {values}")
    return values[0]


# -------------------------------------------------------------------- argument checks
def _check_rows(t, name, dim=None, dim_name=None):
    """t must be a finite floating (n_local, d) tensor (d = dim when given; dim_name says what
    fixes it)."""
    _checks.check_float(t, name)
    if t.dim() != 2 or (dim is not None and t.shape[1] != dim):
        want = f"(n_local, {dim})" if dim is not None else "2-D (n_local, d)"
        if dim is not None and dim_name:
            want += f" ({dim_name}={dim})"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def _check_query_mask(query_mask, rows, device):
    """The number of non-query rows of this shard (all of them without a mask)."""
    if query_mask is None:
        return rows
    if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool:
        raise TypeError(f"query_mask must be a bool tensor, got "
                        f"{getattr(query_mask, 'dtype', type(query_mask).__name__)}")
    if tuple(query_mask.shape) != (rows,):
        raise ValueError(f"query_mask must have shape (n_local,) = ({rows},), got {tuple(query_mask.shape)}")
    if query_mask.device != device:
        raise ValueError(f"query_mask must be on x_shard's device {device}, got {query_mask.device}")
    return rows - int(query_mask.sum())


def _check_isolation(metas, any_query, k):
    others = sum(m["non_queries"] for m in metas)
    if any_query and others < k - 1:
        raise ValueError(f"query_mask leaves {others} non-query rows, fewer than k-1={k - 1}")


def _features_check(x_shard, k, query_mask, dim=None, dim_name=None):
    def check():
        _check_rows(x_shard, "x_shard", dim, dim_name)
        k_ = _checks.as_int(k, "k")
        non_queries = _check_query_mask(query_mask, x_shard.shape[0], x_shard.device)
        return x_shard.shape[0], x_shard.device, {
            "d": x_shard.shape[1], "dtype": str(x_shard.dtype), "k": k_, "non_queries": non_queries,
            "queries": x_shard.shape[0] - non_queries}
    return check


def _check_features_everywhere(metas, total):
    _same_everywhere(metas, "d", "x_shard's feature dim")
    _same_everywhere(metas, "dtype", "x_shard's dtype", TypeError)
    if total == 0:
        raise ValueError("x_shard holds no rows on any rank")


# -------------------------------------------------------------------- ring top-k
def _ring_topk(world: _World, queries, keys, k, query_flags=None, key_flags=None):
    """(n_local, k) global ids: per query row (this rank's rows, in order) the canonical top-k keys
    of all ranks (self forced first; canonical score desc, global id asc: nformer_kernels.canonical),
    merged block by block by torch_ops.RunningTopk. Queries and keys are this rank's rows; key
    blocks go round the ring. query_flags/key_flags (bool, this rank's rows): a flagged query never
    takes a flagged key other than itself."""
    n = queries.shape[0]
    queries, keys = queries.detach().to(torch.float32), keys.detach().to(torch.float32).contiguous()
    local_top = canonical.row_norms(keys).amax() if keys.shape[0] else keys.new_zeros((), dtype=torch.float64)
    top = world.all_reduce_max(local_top.reshape(1).to(world.device, torch.float64), "norms")
    running = torch_ops.RunningTopk(queries, k, canonical.score_error_bound(queries, torch.float32,
                                                                            top.to(queries.device)[0]))
    tensors = [keys] + ([] if key_flags is None else [key_flags.to(torch.uint8)])
    offsets = world.offsets
    self_ids = world.start + torch.arange(n, device=queries.device)  # each query row is its own key
    with canonical.exact_fp32_matmul():
        for owner, held in ring_blocks(world, tensors, "ring"):
            block, flags = held[0], (held[1].bool() if key_flags is not None else None)
            for r0 in range(0, n if block.shape[0] else 0, _QUERY_ROWS):
                rows = slice(r0, min(n, r0 + _QUERY_ROWS))
                for c0 in range(0, block.shape[0], _KEY_COLS):
                    banned = None
                    if query_flags is not None:  # query isolation: queries never neighbour other queries
                        banned = query_flags[rows, None] & flags[None, c0:c0 + _KEY_COLS]
                    running.add(block[c0:c0 + _KEY_COLS], offsets[owner] + c0, self_ids[rows], banned, rows)
    return running.ids if n else torch.empty((0, k), dtype=torch.int64, device=queries.device)


def knn(x_shard: torch.Tensor, k: int, group=None, *, query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n_local, k) int64 global ids of the top-k cosine neighbours of this rank's rows among all
    ranks' rows: nk.knn(x_all, k, query_mask=query_mask_all)[my rows].

    x_shard: (n_local, d) float, this rank's contiguous block of rows. query_mask: bool (n_local,),
    this rank's rows that are queries (they never get another query as a neighbour).
    Per-rank memory O(n_local * (d + k)) plus two key blocks and one score tile.
    """
    world, metas = _gather_checked(group, _features_check(x_shard, k, query_mask))
    _check_features_everywhere(metas, world.total)
    k = _checks.check_k(_same_everywhere(metas, "k", "k"), world.total)
    _check_isolation(metas, sum(m["queries"] for m in metas) > 0, k)
    if world.size == 1:
        return ops.knn(x_shard, k, query_mask=query_mask)
    return _knn(world, x_shard, k, query_mask, any(m["queries"] for m in metas))


def _knn(world, x, k, query_mask, isolate):
    unit = canonical.canonical_rows(x)  # as nk.knn normalises: the same rows on every rank
    flags = None
    if isolate:
        flags = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if query_mask is None else query_mask
    return _ring_topk(world, unit, unit, k, flags, flags)


# -------------------------------------------------------------------- halo plans, reciprocal mask
class _Halo:
    """The rows of other ranks that this rank's neighbour lists name (the halo, by ascending global
    id) and the rows of its own that the other ranks' lists name: built once per neighbour graph
    (one all_to_all of counts, one of ids), then any per-row data moves with one all_to_all."""

    def __init__(self, world: _World, idx: torch.Tensor):
        self.world = world
        ids = torch.unique(idx)  # sorted
        self.ids = ids[(ids < world.start) | (ids >= world.start + world.rows)]
        counts = torch.bincount(world.owners(self.ids), minlength=world.size).to(world.device)
        self.recv_counts = counts.tolist()
        send_counts = torch.empty_like(counts)
        with _blocked("plan"):
            dist.all_to_all_single(send_counts, counts, group=world.group)
        _SENT["plan"] += (world.size - 1) * counts.element_size()
        _RECEIVED["plan"] += (world.size - 1) * counts.element_size()
        self.send_counts = send_counts.tolist()
        requested = world.all_to_all(self.ids.to(world.device), self.recv_counts, self.send_counts, "plan")
        self.send_rows = requested.to(idx.device) - world.start

    @property
    def size(self) -> int:
        return self.ids.numel()

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """Global ids -> positions in [own rows, then halo rows] (own first, halo in id order)."""
        own = (idx >= self.world.start) & (idx < self.world.start + self.world.rows)
        halo = self.world.rows + torch.searchsorted(self.ids, idx).clamp_(max=max(self.size - 1, 0))
        return torch.where(own, idx - self.world.start, halo)

    def fetch(self, tensors: Sequence[torch.Tensor], kind: str) -> List[torch.Tensor]:
        """The halo rows of each tensor (rows = this rank's rows), in one all_to_all of their bytes."""
        parts = [t[self.send_rows].flatten(1).view(torch.uint8) for t in tensors]
        widths = [p.shape[1] for p in parts]
        got = self.world.all_to_all(torch.cat(parts, dim=1).to(self.world.device), self.send_counts,
                                    self.recv_counts, kind).to(tensors[0].device)
        out, col = [], 0
        for t, w in zip(tensors, widths):
            rows = got[:, col:col + w].contiguous().view(t.dtype)
            out.append(rows.view(self.size, *t.shape[1:]))
            col += w
        return out


def _reciprocal(idx: torch.Tensor, halo: _Halo, neighbour_rows: torch.Tensor) -> torch.Tensor:
    """keep[i,t] = i in idx_all[idx[i,t]] from this rank's lists and the halo rows' lists."""
    world = halo.world
    table = torch.cat([idx, neighbour_rows])  # rows in local order, entries global ids
    local = halo.local(idx)
    mine = torch.arange(world.start, world.start + world.rows, device=idx.device)
    keep = torch.empty_like(idx, dtype=torch.bool)
    for r0 in range(0, idx.shape[0], _LOOKUP_ROWS):
        rows = slice(r0, r0 + _LOOKUP_ROWS)
        keep[rows] = (table[local[rows]] == mine[rows, None, None]).any(dim=-1)
    return keep


def _index_check(idx_shard):
    def check():
        if not isinstance(idx_shard, torch.Tensor):
            raise TypeError(f"idx_shard must be a torch.Tensor, got {type(idx_shard).__name__}")
        if idx_shard.dtype != torch.int64:
            raise TypeError(f"idx_shard must be int64, got {idx_shard.dtype}")
        if idx_shard.dim() != 2 or idx_shard.shape[1] == 0:
            raise ValueError(f"idx_shard must be 2-D (n_local, k) with k >= 1, got shape {tuple(idx_shard.shape)}")
        srt = idx_shard.sort(dim=-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("idx_shard repeats a neighbour within a row")
        low, high = (int(srt[:, 0].min()), int(srt[:, -1].max())) if srt.numel() else (0, -1)
        return idx_shard.shape[0], idx_shard.device, {"k": idx_shard.shape[1], "low": low, "high": high}
    return check


def reciprocal_mask(idx_shard: torch.Tensor, group=None) -> torch.Tensor:
    """keep (n_local, k) bool of this rank's neighbour lists (global ids):
    nk.reciprocal_mask(idx_all)[my rows], keep[i,t] = i in idx_all[idx_all[i,t]].

    Fetches the lists of the rows it names from their owners only (all_to_all_single with
    variable splits): O(n_local * k^2) memory and work, O(distinct halo rows * k) bytes.
    """
    world, metas = _gather_checked(group, _index_check(idx_shard))
    k = _same_everywhere(metas, "k", "idx_shard's k (neighbours per row)")
    if k > world.total:
        raise ValueError(f"idx_shard has {k} neighbours per row but only {world.total} rows in all")
    if min(m["low"] for m in metas) < 0 or max(m["high"] for m in metas) >= world.total:
        raise ValueError(f"idx_shard has entries outside [0, {world.total})")
    if world.size == 1:
        return ops.reciprocal_mask(idx_shard)
    halo = _Halo(world, idx_shard)
    return _reciprocal(idx_shard, halo, halo.fetch([idx_shard], "neighbours")[0])


# -------------------------------------------------------------------- NFormer forward
def _landmarks_check(landmarks, depth):
    """Explicit landmarks as lists of positions (compared across ranks), or None."""
    if landmarks is None:
        return None
    if len(landmarks) != depth:
        raise ValueError(f"landmarks must give one set per block ({depth}), got {len(landmarks)}")
    out = []
    for lm in landmarks:
        if not isinstance(lm, torch.Tensor) or lm.dtype != torch.int64 or lm.dim() != 1:
            raise TypeError("landmarks must be (depth, l) int64 or a list of 1-D int64 tensors")
        out.append(lm.tolist())
    return out


def _draw_landmarks(world, model, generator, query_mask, metas):
    """Rank 0 draws each block's landmarks as model.forward would (among the non-query positions
    of all ranks), the draw goes to every rank; returns one (l,) tensor of global positions per block."""
    non_queries = [m["non_queries"] for m in metas]
    pool = sum(non_queries)
    sizes = [min(block.num_landmarks, pool) for block in model.blocks]
    drawn = torch.zeros(sum(sizes), dtype=torch.int64, device=world.device)
    if world.rank == 0:  # positions in the pool, as draw_landmarks(n, l, generator, pool) draws them
        drawn += torch.cat([draw_landmarks(pool, block.num_landmarks, generator) for block in model.blocks]).to(
            world.device)
    world.all_reduce_sum(drawn, "landmarks")
    if query_mask is not None:  # pool position -> global row: each owner of a drawn row fills it in
        first = sum(non_queries[:world.rank])
        mine = (drawn >= first) & (drawn < first + non_queries[world.rank])
        rows = (~query_mask).nonzero().squeeze(1).to(world.device) + world.start
        picked = rows[(drawn - first).clamp(0, rows.numel() - 1)] if rows.numel() else drawn
        drawn = world.all_reduce_sum(torch.where(mine, picked, 0), "landmarks")
    return list(drawn.split(sizes))


def _landmark_rows(world, x, landmarks):
    """The (l, d) feature rows of the landmarks, from their owners, on every rank: each rank then
    projects them itself, exactly as the single-process model does (docs/distributed.md)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # sums of one row and zeros: exact
    rows = torch.zeros((landmarks.numel(), x.shape[1]), dtype=acc, device=world.device)
    local = landmarks.to(world.device) - world.start
    mine = (local >= 0) & (local < world.rows)
    rows[mine] = x[local[mine].to(x.device)].to(device=world.device, dtype=acc)
    return world.all_reduce_sum(rows, "landmarks").to(device=x.device, dtype=x.dtype)


def _local_attention(block, P, R, v, halo, idx, keep):
    """sparse_attention of this rank's rows over its own and the halo rows' R and v.

    The op takes P, R, v and idx of one row set: the halo rows get zero P, nothing kept and
    outputs that are dropped (they cost k*H*l multiply-adds each, their v is never read)."""
    n, h, k = P.shape[0], halo.size, idx.shape[1]
    R_h, v_h = halo.fetch([R, v], "halo")
    pad = torch.arange(k, device=idx.device).expand(h, k)
    attn = ops.sparse_attention(torch.cat([P, P.new_zeros((h, *P.shape[1:]))]), torch.cat([R, R_h]),
                                torch.cat([v, v_h]), torch.cat([halo.local(idx), pad]),
                                torch.cat([keep, keep.new_zeros((h, k))]), block.scale, check_inputs=False)
    return attn[:n]


def _block_forward(world, block, x, landmarks, k, graph):
    """One NFormerLayer on this rank's rows; graph = (idx, keep, halo) of input neighbours, or None
    for neighbours from this block's landmark affinity."""
    n = x.shape[0]
    q_land, k_land, _ = block.qkv(_landmark_rows(world, x, landmarks)).split(block.dim, dim=-1)
    chunk = block._chunk_rows(x)
    if n:
        P, R, v = block._landmark_inputs(x, q_land, k_land, chunk)
    else:  # an empty shard still passes blocks on and serves requests
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        P = R = torch.empty((0, block.num_heads, landmarks.numel()), dtype=acc, device=x.device)
        v = x.new_empty((0, block.dim))
    if graph is None:  # paper Eq. 6: the top-k of sum_h P_h R_h^T, over all ranks' rows
        idx = _ring_topk(world, P.flatten(1), R.flatten(1), k)
        halo = _Halo(world, idx)
        keep = _reciprocal(idx, halo, halo.fetch([idx], "neighbours")[0])
    else:
        idx, keep, halo = graph
    if not n:
        halo.fetch([R, v], "halo")  # serve the other ranks' requests (none for an empty shard)
        return x
    return block._output(x, _local_attention(block, P, R, v, halo, idx, keep), chunk)


def nformer_forward(model: NFormer, x_shard: torch.Tensor,
                    landmarks: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
                    generator: Optional[torch.Generator] = None, group=None, *,
                    query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The eval-mode NFormer output of this rank's rows: model.eval()(x_all, landmarks=...,
    query_mask=...)[my rows] (fp32: within 1e-5 relative on the same landmarks).

    Puts the model in eval mode (as model.eval() does) and runs without autograd. x_shard:
    (n_local, model.in_dim), projected by the model's input_proj (if any) on its own rank before
    the neighbour search, as model.forward does; the output is (n_local, model.dim). landmarks:
    (depth, l) int64 global positions, or a list of per-block sets, the same on every rank; None
    draws them on rank 0 as model.forward draws them (from `generator`, rank 0's, or the global
    RNG; among non-query rows) and sends them to every rank.
    query_mask: bool (n_local,). Neighbours (neighbor_source "input" or "affinity") come from
    knn/reciprocal_mask over all ranks; each block then fetches the R and v rows of its rows'
    neighbours from their owners (a plan built once per neighbour graph) and runs the fused ops
    on its own rows.
    """
    if not isinstance(model, NFormer):
        raise TypeError(f"model must be an nformer_kernels.NFormer, got {type(model).__name__}")

    def check():
        rows, device, meta = _features_check(x_shard, model.topk, query_mask, model.in_dim, "the model's in_dim")()
        meta["landmarks"] = _landmarks_check(landmarks, model.depth)
        return rows, device, meta

    world, metas = _gather_checked(group, check)
    _check_features_everywhere(metas, world.total)
    n_all, k = world.total, min(model.topk, world.total)
    any_query = sum(m["queries"] for m in metas) > 0
    explicit = _same_everywhere(metas, "landmarks", "landmarks")
    if explicit is not None:
        for lm in explicit:
            ops.check_landmarks(torch.tensor(lm, dtype=torch.int64), n_all)
    elif any_query and sum(m["non_queries"] for m in metas) == 0:
        raise ValueError("query_mask flags every position; landmarks need non-query positions")
    if model.neighbor_source == "input":
        _check_isolation(metas, any_query, k)
    model.eval()
    if world.size == 1:
        with torch.no_grad():
            return model(x_shard, landmarks=landmarks, generator=generator, query_mask=query_mask)
    with torch.no_grad():
        if explicit is not None:
            sets = [torch.tensor(lm, dtype=torch.int64, device=x_shard.device) for lm in explicit]
        else:
            sets = _draw_landmarks(world, model, generator, query_mask, metas)
        x = model.project(x_shard)  # row-wise: each rank projects its own rows, before the search
        graph = None
        if model.neighbor_source == "input":
            idx = _knn(world, x, k, query_mask, any_query)
            halo = _Halo(world, idx)
            graph = (idx, _reciprocal(idx, halo, halo.fetch([idx], "neighbours")[0]), halo)
        for block, lm in zip(model.blocks, sets):
            x = _block_forward(world, block, x, lm, k, graph)
        return model.bottleneck(x) if x.shape[0] else x.clone()
