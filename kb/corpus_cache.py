"""Loaded corpora: a ready corpus's stored KV, verified and laid out contiguously per layer on
the serving device, registered with the engine, with its router and citation map.

Where each layout lives (device, host memory, disk) is the tier manager's decision
(`storage/tiers.py`): a corpus that leaves the device is unregistered from the engine (never
while it answers questions) and comes back on its next question, from host memory when parked
there, else from its verified files. Corpus.tier, hits and last_used_at follow in the database.

With a `ShardLink` (`kb serve --shared-ranks S`, docs/SCALING.md) a loaded corpus goes to the
shared ranks (`ShardLink.load`: each reads its slice from the corpus's KV files, or is sent it
when it cannot) and this rank keeps only the view: router, passage selector, shapes. It never
stacks the corpus: it reads the files one by one and keeps the preamble's KV and, for a corpus
that selects its passages, the selecting layers' keys (`_read_view`); the router's summaries
come from the stored chunk index, or are streamed from the files on a version's first load. The device
tier then stands for the shared ranks' memory (S times KB_GPU_CACHE_GB, no host tier): leaving
it drops the slices there (`ShardLink.drop`). When a shared rank fails, the link places the
corpora again over the survivors (and over a rank that comes back), keeping the views valid;
the device tier's budget follows the members. When it cannot (none left, or no room there:
the link is `down`), every corpus is installed again here, memory permitting, and served
in-process (`fell_back`) until the link serves again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from sqlalchemy import select

from index import CorpusRouter
from index import store as index_store
from index.summaries import ChunkSummaries, chunk_summaries
from kb.citations import CitationMap, SegmentRef
from kb.engine.distributed.protocol import KVFile, ShardLink, SharedRankError
from kb.engine.engine import Engine
from kb.engine.selection import (
    SelectionConfig,
    attach_selector,
    install_selector,
    selection_config,
)
from kb.engine.shared_kv import KVMeta, SharedKV
from kb.errors import Conflict, NotFound, NotReady, TooBusy
from kb.ingest.build import position_limit
from kb.model.loader import LoadedModel
from kb.settings import Settings
from storage.db import Database
from storage.kvstore import KVCorruptError, quantize_fp8_chunks, read_kv
from storage.models import ChunkIndex, Corpus, Document, Segment, utcnow
from storage.tiers import Move, TierError, TierManager

log = logging.getLogger(__name__)

GiB = 2**30


@dataclass
class LoadedCorpus:
    shared: SharedKV
    citation_map: CitationMap
    version: str


@dataclass
class _Layout:
    """What a corpus's files give: k, v [L, N, Hkv, d] and how to cite and place them."""

    k: torch.Tensor
    v: torch.Tensor
    refs: list[SegmentRef]
    max_end: int
    preamble_len: int
    chunk_size: int
    positions: (
        torch.Tensor
    )  # [N] int64 stored position of every shared token (RoPE was applied at it)
    files: list[KVFile]  # the files it was read from, in order (the shared ranks read them)
    # a sharded read (`_read_view`: k and v are then meta tensors of the layout's shape): the
    # preamble's k, v per layer, and per layer the keys where the selector reads them (meta
    # elsewhere; None when the corpus does not select)
    preamble: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    keys: list[torch.Tensor] | None = None


class _StreamedSummaries:
    """One layer's chunk summaries over keys that arrive in pieces (file by file): complete
    chunks are summarised as they fill, the partial one waits for the next piece."""

    def __init__(self, chunk_size: int):
        self.chunk_size, self.parts, self.num_tokens = chunk_size, [], 0
        self.carry: torch.Tensor | None = None

    def add(self, keys: torch.Tensor) -> None:
        x = keys if self.carry is None else torch.cat([self.carry, keys])
        full = x.shape[0] // self.chunk_size * self.chunk_size
        if full:
            self.parts.append(chunk_summaries(x[:full], self.chunk_size))
        self.carry = x[full:].clone() if full < x.shape[0] else None
        self.num_tokens += keys.shape[0]

    def finish(self) -> ChunkSummaries:
        if self.carry is not None:
            self.parts.append(chunk_summaries(self.carry, self.chunk_size))
            self.carry = None
        fields = [torch.cat([getattr(p, f) for p in self.parts]) for f in ("mean", "kmin", "kmax")]
        return ChunkSummaries(*fields, self.chunk_size, self.num_tokens)


def _budget(gb: float) -> int:
    return int(gb * GiB)


def segment_ref(pos: int, document: Document, seg: Segment) -> SegmentRef:
    """The citation ref of segment `seg` of `document`, laid out at shared position `pos`."""
    return SegmentRef(
        pos,
        seg.num_tokens,
        document.filename,
        document.id,
        seg.page_start,
        seg.page_end,
        seg.char_start,
        seg.text,
    )


class CorpusCache:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        model: Callable[[], LoadedModel],
        engine: Callable[[], Engine],
        link: ShardLink | None = None,
    ):
        self.settings, self.db = settings, db
        self._model, self._engine = model, engine
        self._engine_made = False
        self.loaded: dict[str, LoadedCorpus] = {}
        self.lock = threading.RLock()
        self.link = link
        self.fell_back = False  # the link failed: corpora are served from this rank since
        self._remote: dict[str, SharedKV] = {}  # key -> view whose slices the shared ranks hold
        self._sources: dict[str, str] = {}  # key -> where the shared ranks got the slices from
        self._retired: list[str] = []  # keys of replaced versions still answering questions
        self.tiers = self._tier_manager()

    @property
    def sharded(self) -> bool:
        """Whether corpora loaded now go to the shared ranks (a link that has not failed)."""
        return self.link is not None and not self.fell_back

    def _tier_manager(self) -> TierManager:
        """Budgets on this rank's device and host memory; sharded, the device tier is the shared
        ranks' memory (entries hold meta tensors of the sizes they hold there) and there is no
        host tier: a corpus leaving them goes to disk."""
        s = self.settings
        if self.sharded:
            ranks = len(self.link.holders)
            budgets = {"gpu": _budget(s.gpu_cache_gb) * ranks, "cpu": 0}
            return TierManager(budgets, "meta", on_move=self._on_move)
        budgets = {"gpu": _budget(s.gpu_cache_gb), "cpu": _budget(s.cpu_cache_gb)}
        return TierManager(budgets, s.device, on_move=self._on_move)

    def _check_link(self) -> None:
        """Follow the link. Down (no shared rank left, or no room on the survivors): forget the
        sharded views (the engine keeps them until the same keys are registered again, here)
        and serve every corpus from this rank. Serving again (a rank came back): the corpora
        held here leave (those answering questions once they finish) and load onto the shared
        ranks on their next question. Otherwise the device tier's budget follows the members."""
        link = self.link
        if link is None:
            return
        if self.sharded and link.down is not None:
            log.error(
                "the shared ranks are unavailable (%s); corpora are served from rank 0", link.down
            )
            self.fell_back = True
            self._remote.clear()
            self._sources.clear()
            self.loaded.clear()
            self.tiers = self._tier_manager()
        elif self.fell_back and link.down is None:
            log.info("the shared ranks %s answer again: corpora go back to them", link.members)
            for cached in self.loaded.values():
                key = cached.shared.key
                if self._in_use(key):
                    self._retired.append(key)
                elif self._engine_made:
                    self.engine.unregister_corpus(key)
            self.fell_back = False
            self.loaded.clear()
            self.tiers = self._tier_manager()
        elif self.sharded:
            self.tiers.budgets["gpu"] = _budget(self.settings.gpu_cache_gb) * len(link.holders)

    def _drop_remote(self, key: str) -> None:
        """Free a view's slices on the shared ranks (nothing to free once the link failed)."""
        view = self._remote.pop(key, None)
        self._sources.pop(key, None)
        if view is None or self.link is None or self.link.down is not None:
            return
        try:
            self.link.drop(view)
        except SharedRankError as e:
            log.error("corpus %s: %s", key, e)

    def _unregister(self, key: str) -> None:
        """Take a corpus version out of the engine and off the shared ranks."""
        if self._engine_made:
            self.engine.unregister_corpus(key)
        self._drop_remote(key)

    def _sweep(self) -> None:
        """Unregister replaced versions whose last questions have finished."""
        busy = [k for k in self._retired if self._in_use(k)]
        current = {c.shared.key for c in self.loaded.values()}
        for key in self._retired:
            if key not in busy and key not in current:
                self._unregister(key)
        self._retired = busy

    def shard_rows(self, name: str) -> list[dict]:
        """Where a loaded corpus's slices are: per shared rank its chunks, tokens, bytes and where
        it got them ("kv store": read there, "rank 0": sent); empty unless the shared ranks hold
        it and the link works."""
        cached = self.loaded.get(name)
        if cached is None or cached.shared.key not in self._remote:
            return []
        view = cached.shared
        placement = self.link.placement(view)
        if placement is None:
            return []
        per_token = view.nbytes // max(1, view.num_tokens)
        return [
            {
                "rank": s.rank,
                "chunks": [s.chunk_start, s.chunk_end],
                "tokens": s.num_tokens,
                "bytes": s.num_tokens * per_token,
                "loaded_from": self._sources.get(view.key, "rank 0"),
            }
            for s in placement.shards
        ]

    @property
    def model(self) -> LoadedModel:
        return self._model()

    @property
    def engine(self) -> Engine:
        self._engine_made = True
        return self._engine()

    def _in_use(self, key: str) -> bool:
        return self._engine_made and self.engine.in_use(key)

    def drop(self, name: str) -> None:
        """Forget a corpus's loaded KV (deleted, or changed: the next question reloads it)."""
        with self.lock:
            old = self.loaded.pop(name, None)
            if old is None:
                return
            if self._in_use(old.shared.key):
                self.loaded[name] = old
                raise Conflict(
                    f"corpus {name!r} is answering questions; try again when they finish"
                )
            self._unregister(old.shared.key)
            self.tiers.remove(name)

    def _on_move(self, m: Move) -> None:
        """A layout changed tier: leaving the device unregisters it; the database records it."""
        cached = self.loaded.get(m.name)
        if m.src == "gpu" and cached is not None:
            self._unregister(cached.shared.key)  # the tier manager checked in_use
        with self.db.session() as sess:
            corpus = sess.scalar(select(Corpus).where(Corpus.name == m.name))
            if corpus is not None:
                corpus.tier = m.dst
        log.info("corpus %s: shared KV %s -> %s", m.name, m.src, m.dst)

    def load(self, name: str) -> LoadedCorpus:
        """The corpus's shared KV on the serving device (or the shared ranks): as held, promoted
        from host memory, or read from its verified files; counts a hit. A link that fails
        while the corpus is sent makes this rank serve it (and every corpus after it)."""
        with self.lock:
            self._check_link()
            self._sweep()
            try:
                return self._load(name)
            except SharedRankError:
                self._check_link()
                return self._load(name)

    def _load(self, name: str) -> LoadedCorpus:
        with self.lock:
            with self.db.session() as sess:
                corpus = sess.scalar(select(Corpus).where(Corpus.name == name))
                if corpus is None:
                    raise NotFound(f"corpus {name!r} does not exist")
                if corpus.status != "ready":
                    raise NotReady(f"corpus {name!r} is {corpus.status}, not ready")
                # the layout changes with the settings and with the set of ready documents
                ready = ",".join(str(d.id) for d in corpus.documents if d.stage == "ready")
                version = f"{corpus.cache_key}:{ready}"
                pinned = corpus.pinned
                corpus.hits = (corpus.hits or 0) + 1
                corpus.last_used_at = utcnow()
                cached = self.loaded.get(name)
                entry = self.tiers.entries.get(name)
                layout, damaged = None, None
                # a membership change of the shared ranks that could not place it again
                lost = cached is not None and self._lost(cached)
                if (
                    cached is None
                    or cached.version != version
                    or entry is None
                    or entry.tensors is None
                    or lost
                ):
                    try:
                        layout = self._read(name, corpus)
                    except (
                        KVCorruptError
                    ) as e:  # recorded on commit: raising here would roll it back
                        corpus.status, damaged = "stale", e
                        log.error("corpus %s: %s; marked stale for rebuild", name, e)
            if damaged is not None:
                raise NotReady(
                    f"corpus {name!r} has a damaged KV file and must be rebuilt"
                ) from damaged
            if cached is not None and cached.version == version and entry is not None:
                if self.sharded and (entry.tier != "gpu" or lost):  # not on the shared ranks
                    return self._install(name, version, layout, pinned)
                if entry.tier != "gpu":
                    if layout is not None:  # evicted to disk: the same layout from its files
                        self._place(name, self._serving(layout))
                    else:  # parked in host memory
                        self._move_up(name)
                    cached.shared = self._shared(cached.shared.key, cached.shared, entry.tensors)
                    self.engine.register_corpus(cached.shared)
                self.tiers.touch(name)
                return cached
            return self._install(name, version, layout, pinned)

    def _lost(self, cached: LoadedCorpus) -> bool:
        """A sharded view whose corpus the shared ranks no longer hold."""
        key = cached.shared.key
        return self.sharded and key in self._remote and not self.link.holds(cached.shared)

    def _read(self, name: str, corpus: Corpus) -> _Layout:
        """Read and verify every KV file of the corpus (KVCorruptError on a damaged one);
        sharded, only what this rank keeps of it (`_read_view`)."""
        if self.sharded:
            return self._read_view(name, corpus)
        cfg = corpus.settings
        if cfg.get("weights") != self.model.weights_hash:
            raise NotReady(f"corpus {name!r} was built with another model; rebuild it")
        pk, pv = read_kv(corpus.preamble_kv_file, corpus.preamble_checksum, dequantize=True)
        ks, vs, refs = [pk], [pv], []
        files = [KVFile(str(corpus.preamble_kv_file), corpus.preamble_checksum, pk.shape[1])]
        pos = max_end = pk.shape[1]
        where = [torch.arange(pk.shape[1])]
        for d in corpus.documents:
            if d.stage != "ready":
                continue
            for seg in d.segments:
                k, v = read_kv(seg.kv_file, seg.kv_checksum, dequantize=True)
                refs.append(segment_ref(pos, d, seg))
                max_end = max(max_end, seg.pos_start + seg.num_tokens)
                where.append(torch.arange(seg.pos_start, seg.pos_start + seg.num_tokens))
                ks.append(k)
                vs.append(v)
                files.append(KVFile(str(seg.kv_file), seg.kv_checksum, k.shape[1]))
                pos += seg.num_tokens
        dtype = torch.promote_types(ks[0].dtype, ks[-1].dtype)  # fp8 files read as 16-bit
        k_all = torch.cat([k.to(dtype) for k in ks], dim=1)  # [L, N, Hkv, d]
        v_all = torch.cat([v.to(dtype) for v in vs], dim=1)
        return _Layout(
            k_all,
            v_all,
            refs,
            max_end,
            corpus.preamble_len,
            cfg["chunk_size"],
            torch.cat(where),
            files,
        )

    def _read_view(self, name: str, corpus: Corpus, usable: int | None = None) -> _Layout:
        """What rank 0 keeps of a sharded corpus, read and verified file by file, never stacked:
        the preamble's k and v, the keys of the layers the passage selector reads (only for a
        corpus beyond `usable` positions, default the model's: `_selection_config`), the stored
        positions, the citation refs and the file list; k and v are meta tensors of the
        layout's shape. The shared ranks read (and verify) their slices from the same files."""
        cfg = corpus.settings
        if cfg.get("weights") != self.model.weights_hash:
            raise NotReady(f"corpus {name!r} was built with another model; rebuild it")
        pk, pv = read_kv(corpus.preamble_kv_file, corpus.preamble_checksum, dequantize=True)
        p, chunk = pk.shape[1], cfg["chunk_size"]
        segments = [(d, g) for d in corpus.documents if d.stage == "ready" for g in d.segments]
        n = p + sum(g.num_tokens for _, g in segments)
        always = -(-corpus.preamble_len // chunk)
        config = self._selection_config(n, -(-n // chunk), always, usable)
        keep = config.layers if config is not None else ()
        kept = {layer: [pk[layer]] for layer in keep}
        files = [KVFile(str(corpus.preamble_kv_file), corpus.preamble_checksum, p)]
        refs, where, pos, max_end, dtype = [], [torch.arange(p)], p, p, pk.dtype
        for d, seg in segments:
            k, _ = read_kv(seg.kv_file, seg.kv_checksum, dequantize=True)
            refs.append(segment_ref(pos, d, seg))
            max_end = max(max_end, seg.pos_start + seg.num_tokens)
            where.append(torch.arange(seg.pos_start, seg.pos_start + seg.num_tokens))
            for layer in keep:
                kept[layer].append(k[layer])
            files.append(KVFile(str(seg.kv_file), seg.kv_checksum, k.shape[1]))
            dtype = torch.promote_types(dtype, k.dtype)  # fp8 files read as 16-bit
            pos += seg.num_tokens
        layers, _, hkv, d = pk.shape
        meta = torch.empty(layers, n, hkv, d, dtype=dtype, device="meta")
        keys = None
        if keep:
            keys = [
                torch.cat([x.to(dtype) for x in kept[layer]])
                if layer in kept
                else torch.empty(n, hkv, d, dtype=dtype, device="meta")
                for layer in range(layers)
            ]
        preamble = ([x.to(dtype) for x in pk], [x.to(dtype) for x in pv])
        return _Layout(
            meta,
            meta,
            refs,
            max_end,
            corpus.preamble_len,
            chunk,
            torch.cat(where),
            files,
            preamble=preamble,
            keys=keys,
        )

    def _summaries_from_files(self, layout: _Layout) -> list[ChunkSummaries]:
        """Every layer's chunk summaries streamed from the layout's files (a sharded load holds
        no layout): each file read once, a chunk cut by a file edge joined from both sides."""
        streams = [_StreamedSummaries(layout.chunk_size) for _ in range(layout.k.shape[0])]
        for f in layout.files:
            k, _ = read_kv(f.path, f.checksum, dequantize=True)
            for layer, stream in enumerate(streams):
                stream.add(k[layer].to(layout.k.dtype))
        return [stream.finish() for stream in streams]

    def _place(self, name: str, tensors: list[torch.Tensor]) -> None:
        """Hold a layout on the device, making room there; parks it in host memory and says why
        when the device has no room."""
        tier = self.tiers.put(name, tensors, "gpu")
        if tier != "gpu":
            need = self.tiers.get(name).nbytes
            if not self.tiers.fits("gpu", need):
                raise Conflict(
                    f"corpus {name!r} needs {need / 2**20:.1f} MiB of shared KV on the device; "
                    f"KB_GPU_CACHE_GB is {self.settings.gpu_cache_gb:g}"
                )
            raise TooBusy(
                f"no room on the device for corpus {name!r}: the others there are pinned or in use"
            )

    def _move_up(self, name: str) -> None:
        try:
            self.tiers.move(name, "gpu")
        except TierError as e:
            raise TooBusy(str(e)) from e

    def _serving(self, layout: _Layout) -> list[torch.Tensor]:
        """The tensors a corpus is served from: [k, v] 16-bit, or for `kv_dtype = float8`
        [k, v, k_scale, v_scale] in e4m3 with one scale per (layer, chunk, KV head), which halves
        its memory on every tier (the attention kernels take the scales). On the CPU
        (`serve_kv_dtype = auto`) a 16-bit layout is laid out once in float32, the dtype the CPU
        attention computes in, so no decode step converts stored blocks again. The shared ranks
        take no scales: sharded, a float8 corpus is served from its 16-bit layout."""
        if self.settings.kv_dtype != "float8" or self.sharded:
            if self.settings.serve_kv_dtype == "auto" and str(self.settings.device) == "cpu":
                return [layout.k.float(), layout.v.float()]
            return [layout.k, layout.v]
        (kq, ks), (vq, vs) = (
            quantize_fp8_chunks(x, layout.chunk_size) for x in (layout.k, layout.v)
        )
        return [kq, vq, ks, vs]

    @staticmethod
    def _kv_meta(tensors: list[torch.Tensor], meta: KVMeta) -> KVMeta:
        """`meta` with the per-layer scales of an fp8 layout ([C, Hkv] each), or without any."""
        if len(tensors) == 4:
            return replace(
                meta, k_scale=list(tensors[2].unbind(0)), v_scale=list(tensors[3].unbind(0))
            )
        return replace(meta, k_scale=None, v_scale=None)

    def _shared(self, key: str, like: SharedKV, tensors: list[torch.Tensor]) -> SharedKV:
        """A SharedKV over the entry's current tensors, keeping the router and the metadata."""
        k_all, v_all = tensors[:2]
        k, v = list(k_all.unbind(0)), list(v_all.unbind(0))
        return replace(like, key=key, k=k, v=v, meta=self._kv_meta(tensors, like.meta))

    def _install(self, name: str, version: str, layout: _Layout, pinned: bool) -> LoadedCorpus:
        """A new version of the corpus: replace the old one (left registered while in use)."""
        key = f"{name}@{version}"
        old = self.loaded.pop(name, None)
        if old is not None and self._in_use(old.shared.key):
            if old.shared.key != key:  # the same key is registered again below
                self._retired.append(old.shared.key)  # unregistered once its questions finish
        elif old is not None:
            self._unregister(old.shared.key)
        sharded = self.sharded
        self.tiers.track(name, 0, in_use=lambda: self._in_use(key), pinned=pinned)
        tensors = self._serving(layout)
        held = tensors
        if sharded:  # the tier manager counts what the shared ranks will hold: meta tensors
            held = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors]
        try:
            self._place(name, held)
        except (TooBusy, Conflict):
            self.tiers.remove(name)
            raise
        if not sharded:
            tensors = self.tiers.get(name).tensors
        chunk = layout.chunk_size
        shared = SharedKV(
            key=key,
            k=list(tensors[0].unbind(0)),
            v=list(tensors[1].unbind(0)),
            chunk_size=chunk,
            pos_offset=layout.max_end,
            preamble_len=layout.preamble_len,
            positions=layout.positions,
            meta=self._kv_meta(tensors, KVMeta()),
        )
        if shared.num_chunks > shared.always_chunks + 1:
            # summaries from the 16-bit keys as read (an fp8 layout's own are coarser)
            summaries = self._stored_summaries(name, version, shared, layout)
            # given the summaries, the router reads only the keys' count and device: sharded, the
            # keys stay off the device (they travel to the shared ranks from host memory)
            device = torch.device(self.settings.device)
            marks = [torch.empty(shared.num_tokens, 0, 0, device=device)] * len(shared.k)
            shared.router = CorpusRouter(
                marks if sharded else shared.k,
                chunk,
                shared.always_chunks,
                self.settings.router,
                summaries,
                dense_layers=self.settings.routed_dense_layers,
            )
        cmap = CitationMap(layout.refs, chunk, self.model.tokenizer)
        self._attach_selector(shared, layout, cmap)
        if sharded:
            try:  # each shared rank reads its slice from the files; this rank keeps the view
                shared, read = self.link.load(shared, layout.files, layout.k.dtype, in_memory=False)
            except SharedRankError:
                self.tiers.remove(name)
                raise
            self._remote[key] = shared
            self._sources[key] = "kv store" if read else "rank 0"
        loaded = LoadedCorpus(shared, cmap, version)
        self.engine.register_corpus(shared)
        self.loaded[name] = loaded
        self.tiers.touch(name)
        return loaded

    def _attach_selector(self, shared: SharedKV, layout: _Layout, cmap: CitationMap) -> None:
        """Attention retrieval for a corpus beyond the model's context and the selection budget
        (kb/engine/selection.py `attach_selector`), once per layout; its lexical index from the
        chunks' tokens (`cmap.chunk_tokens`)."""
        lm = self.model
        tokens = functools.partial(cmap.chunk_tokens, shared.num_chunks)
        if layout.preamble is None:
            usable = position_limit(lm.config.max_position_embeddings)
            attach_selector(shared, list(layout.k.unbind(0)), lm, self.settings, usable, tokens)
        elif layout.keys is not None:
            self._attach_view_selector(shared, layout, chunk_tokens=tokens)

    def _selection_config(
        self, num_tokens: int, num_chunks: int, always: int, usable: int | None = None
    ) -> SelectionConfig | None:
        """The passage selector's configuration for a corpus of this size, or None when it is
        read whole: `attach_selector`'s checks and choices (kb/engine/selection.py), made here
        before a sharded read, which keeps only the keys of the layers chosen."""
        cfg = self.model.config
        if usable is None:
            usable = position_limit(cfg.max_position_embeddings)
        return selection_config(self.settings, cfg, num_tokens, num_chunks, always, usable)

    def _attach_view_selector(
        self,
        shared: SharedKV,
        layout: _Layout,
        usable: int | None = None,
        chunk_tokens: Callable[[], list[list[int]]] | None = None,
    ) -> None:
        """`attach_selector` for a sharded read: the selector built from the selecting layers'
        keys rank 0 kept, given the preamble's KV (in the served dtype) before its calibration,
        since the view holds no keys or values; `chunk_tokens` for its lexical index."""
        lm = self.model
        config = self._selection_config(
            shared.num_tokens, shared.num_chunks, shared.always_chunks, usable
        )
        if config is None:
            return
        served = shared.k[0].dtype
        preamble = tuple([x.to(served) for x in part] for part in layout.preamble)
        install_selector(
            shared, layout.keys, lm, config, self.settings.system_prompt, preamble, chunk_tokens
        )

    def _stored_summaries(
        self, name: str, version: str, shared: SharedKV, layout: _Layout
    ) -> list[ChunkSummaries]:
        """The layout's chunk summaries from its stored index, made and stored on first load of
        this version (older versions' indexes are removed); a damaged index is rebuilt. Made
        from the layout's keys, or streamed from its files when it holds none (sharded)."""
        with self.db.session() as sess:
            corpus = sess.scalar(select(Corpus).where(Corpus.name == name))
            row = sess.scalar(
                select(ChunkIndex).where(
                    ChunkIndex.corpus_id == corpus.id, ChunkIndex.version == version
                )
            )
            corpus_id, path = corpus.id, (row.path if row is not None else None)
        if path is not None:
            try:
                return index_store.load_summaries(path)
            except (index_store.IndexFormatError, OSError) as e:
                log.warning("corpus %s: stored chunk index unusable (%s); rebuilding it", name, e)
        if layout.preamble is None:
            summaries = [chunk_summaries(k, shared.chunk_size) for k in layout.k.unbind(0)]
        else:
            summaries = self._summaries_from_files(layout)
        digest = hashlib.sha256(version.encode()).hexdigest()[:16]
        folder = self.settings.kv_dir / str(corpus_id) / "index" / digest
        manifest = index_store.save(folder, summaries)
        with self.db.session() as sess:
            for old in sess.scalars(select(ChunkIndex).where(ChunkIndex.corpus_id == corpus_id)):
                if old.path != str(folder):
                    shutil.rmtree(old.path, ignore_errors=True)
                sess.delete(old)
            sess.flush()
            sess.add(
                ChunkIndex(
                    corpus_id=corpus_id,
                    version=version,
                    path=str(folder),
                    format_version=manifest.format_version,
                    chunk_size=manifest.chunk_size,
                    num_chunks=manifest.num_chunks,
                    num_tokens=manifest.num_tokens,
                )
            )
        return summaries

    def move(self, name: str, tier: str) -> str:
        """Admin move of a corpus's shared KV to `tier` (gpu loads it); returns where it is.
        Refused (Conflict) while pinned and moving down, or answering questions."""
        if tier not in ("gpu", "cpu", "disk"):
            raise Conflict(f"unknown tier {tier!r}: one of gpu, cpu, disk")
        with self.lock:
            self._check_link()
            if tier == "cpu" and self.sharded:
                raise Conflict(
                    "the shared ranks hold corpora on their devices only: move to gpu or disk"
                )
            if tier != "disk" and (
                name not in self.tiers.entries or self.tiers.get(name).tier == "disk"
            ):
                self.load(name)  # from its files, onto the device
            if name not in self.tiers.entries:
                return "disk"  # never loaded here: its KV is only on disk already
            try:
                self.tiers.move(name, tier)
            except TierError as e:
                raise Conflict(str(e)) from e
            return self.tiers.get(name).tier
