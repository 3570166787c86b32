"""A retrieval index of ALBEF: a gallery of images or texts encoded once, queried many times, at any size.

ALBEF retrieves in two stages, and the index serves each from its own store:

- ITC shortlist: the projected, L2-normalised features of every item in a FAISS index (exact inner product by
  default; HNSW, IVF or IVF-PQ for large galleries), searched for each query's `k` best items, which are then
  re-scored exactly from the stored fp32 features (so an approximate index only chooses the shortlist).
- ITM re-ranking: the unimodal token embeddings of the shortlisted items only, read from a flat token store (in
  memory, or a raw file on disk that is memory-mapped, so that a query reads only its shortlist's rows), stored in
  `token_dtype`: by default float32 in memory (the dense scores, bit for bit) and float16 in a folder (half the
  disk; ITM scores move by about 1e-4 on the demo model, see the README); or, with
  `store_tokens=False`, no tokens at all: the items' sources (image paths, texts) are kept and the shortlisted
  items are encoded again at query time.

`build_retrieval_index` encodes a gallery in chunks into a folder: finished chunks survive an interruption and a
restart continues after them, and under `torchrun` / `accelerate launch` (with a process group) each rank
encodes its share of the chunks, after which rank 0 merges them into the index.

The module is flat and imports only its neighbours so that it travels with a saved model folder (remote code);
FAISS is imported when a search first needs it (`pip install albef-hf[faiss]`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["AlbefRetrievalIndex", "build_retrieval_index"]

INDEX_METADATA = "index.json"
FEATURES_FILE = "features.bin"
TOKENS_FILE = "tokens.bin"
LENGTHS_FILE = "lengths.bin"
ITC_FILE = "itc.faiss"
CHUNKS_FOLDER = "chunks"
BUILD_MANIFEST = "build.json"
_FORMAT_VERSION = 2

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")
TOKEN_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# below this many items per inverted list and PQ centroid FAISS's k-means has too few points to train well
_TRAIN_POINTS_PER_CENTROID = 39
_TRAIN_SAMPLE_PER_CENTROID = 64
_HNSW_NEIGHBOURS = 32
# an IVF-PQ shortlist is fetched this many times longer and cut to k by the exact scores of the stored features
_PQ_REFINE_FACTOR = 4
_ADD_BLOCK = 65_536

# Encodes a list of gallery items (their position in the gallery is `start` + their own): projected features
# `(n, embed_dim)`, token embeddings `(n, seq_len, hidden)` and the padding mask `(n, seq_len)` (None for images).
Encoder = Callable[[list[Any], int], tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "the ALBEF retrieval index searches with FAISS, which is not installed: pip install albef-hf[faiss] "
            "(or faiss-cpu, or faiss-gpu)"
        ) from error
    return faiss


class _Rows:
    """Rows of one width and dtype, appended in chunks: in memory, or in a raw file read through a memory map."""

    def __init__(self, width: int, dtype: torch.dtype, path: str | None = None, count: int = 0) -> None:
        self.width, self.dtype, self.path, self.count = width, dtype, path, count
        self._parts: list[torch.Tensor] = []
        self._map: torch.Tensor | None = None

    def append(self, values: torch.Tensor) -> None:
        values = values.detach().to("cpu", self.dtype).reshape(-1, self.width).contiguous()
        if self.path is None:
            self._parts.append(values)
        else:
            # rows past `count` are left by an interrupted append (the metadata did not count them): overwrite
            with open(self.path, "r+b" if os.path.exists(self.path) else "wb") as file:
                file.seek(self.count * self.width * values.element_size())
                file.write(values.numpy().tobytes())
                file.truncate()
            self._map = None
        self.count += values.shape[0]

    def all(self) -> torch.Tensor:
        """Every row: one tensor in memory, or a tensor over the memory map (pages are read when indexed)."""
        if self.path is None:
            if len(self._parts) != 1:
                self._parts = [
                    torch.cat(self._parts) if self._parts else torch.empty(0, self.width, dtype=self.dtype)
                ]
            return self._parts[0]
        if self._map is None:
            if self.count == 0:
                return torch.empty(0, self.width, dtype=self.dtype)
            dtype = torch.empty((), dtype=self.dtype).numpy().dtype
            # copy-on-write: torch wants a writable array; nothing is ever written back to the file
            array = np.memmap(self.path, dtype=dtype, mode="c", shape=(self.count, self.width))
            self._map = torch.from_numpy(array)
        return self._map

    def write(self, path: str) -> None:
        """Write the rows to `path` (raw, row-major)."""
        if self.path is not None and os.path.abspath(self.path) == os.path.abspath(path):
            return
        if self.path is not None:
            shutil.copyfile(self.path, path)
            with open(path, "r+b") as file:
                file.truncate(self.count * self.width * torch.empty((), dtype=self.dtype).element_size())
            return
        with open(path, "wb") as file:
            file.write(self.all().numpy().tobytes())


class AlbefRetrievalIndex:
    """An encoded gallery: a FAISS index over its ITC features and a store of its ITM tokens.

    Build one with the retrieval pipeline's `build_index` (or `build_retrieval_index`), or empty and `add` encoded
    items in chunks. A folder index (`directory`) writes its features and tokens to disk as they are added and
    memory-maps them; `save` writes the metadata and the FAISS index, `load` reads them back.

    Args:
        modality: `"image"` (queried with texts) or `"text"` (queried with images).
        embed_dim: size of the projected ITC features.
        hidden_size: size of the items' token embeddings (the vision or text hidden size).
        directory: a folder for the features and tokens (None: keep them in memory).
        index_type: the ITC search: `"flat"` (exact inner product, the default), `"hnsw"`, `"ivf"` (IVF-flat)
            or `"ivfpq"` (IVF with product quantisation, for galleries too large for fp32 features in memory).
        token_dtype: `torch.float32` or `torch.float16` for the stored tokens (default: float32 in memory, float16
            in a folder).
        store_tokens: keep the token embeddings (True), or keep the items' sources and encode the shortlisted
            items again at query time (False; texts are the sources of a text gallery, image paths or URLs of an
            image gallery).
        nprobe: inverted lists searched per query (IVF types; default by gallery size, see `search_parameters`).
        ef_search: HNSW search depth (default by `k`).
        model_name: the model that built the index (informative).
    """

    def __init__(
        self,
        modality: str,
        embed_dim: int,
        hidden_size: int,
        directory: str | os.PathLike | None = None,
        index_type: str = "flat",
        token_dtype: torch.dtype | None = None,
        store_tokens: bool = True,
        nprobe: int | None = None,
        ef_search: int | None = None,
        model_name: str | None = None,
    ) -> None:
        if token_dtype is None:
            token_dtype = torch.float32 if directory is None else torch.float16
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
        if token_dtype not in TOKEN_DTYPES.values():
            raise ValueError(f"token_dtype must be torch.float16 or torch.float32, got {token_dtype}")
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.modality = modality
        self.embed_dim, self.hidden_size = embed_dim, hidden_size
        self.directory = None if directory is None else os.fspath(directory)
        self.index_type, self.token_dtype, self.store_tokens = index_type, token_dtype, store_tokens
        self.nprobe, self.ef_search, self.model_name = nprobe, ef_search, model_name
        self.ids: list[Any] = []
        # the texts of a text gallery; the image paths of an image gallery without tokens; else None
        self.sources: list[Any] | None = [] if (modality == "text" or not store_tokens) else None
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
        self._features = _Rows(embed_dim, torch.float32, self._file(FEATURES_FILE))
        self._tokens = _Rows(hidden_size, token_dtype, self._file(TOKENS_FILE)) if store_tokens else None
        self._lengths = _Rows(1, torch.int32, self._file(LENGTHS_FILE)) if store_tokens else None
        # item i's tokens are rows offsets[i]:offsets[i + 1] of the token store (computed on first read)
        self._offsets: torch.Tensor | None = None
        self._max_length: int | None = None
        self._itc = None

    # ------------------------------------------------------------------------------------------
    # Contents
    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def query_modality(self) -> str:
        """What queries this index: texts for an image gallery, images for a text gallery."""
        return "text" if self.modality == "image" else "image"

    @property
    def texts(self) -> list[str] | None:
        """The gallery texts of a text gallery (returned with the results); None for images."""
        return self.sources if self.modality == "text" else None

    @property
    def features(self) -> torch.Tensor:
        """`(num_items, embed_dim)` fp32 ITC features (a memory map for a folder index)."""
        return self._features.all()

    def add(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ids: Sequence[Any] | None = None,
        sources: Sequence[Any] | None = None,
    ) -> None:
        """Append encoded items.

        Args:
            features: `(n, embed_dim)` projected, L2-normalised features.
            embeds: `(n, seq_len, hidden)` token embeddings (needed when the index stores tokens).
            attention_mask: `(n, seq_len)` right-padded mask of text tokens (None for images).
            ids: one identifier per item (default: their positions in the gallery).
            sources: the items' texts (text galleries) or image paths (image galleries without tokens).
        """
        count = features.shape[0]
        tokens = lengths = None
        if self.store_tokens:
            if embeds is None or embeds.shape[0] != count:
                raise ValueError("an index that stores tokens needs the token embeddings of every added item")
            tokens, lengths = _flatten_tokens(embeds, attention_mask, self.modality)
        self._append(features, tokens, lengths, ids, sources)

    def _append(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor | None,
        lengths: torch.Tensor | None,
        ids: Sequence[Any] | None,
        sources: Sequence[Any] | None,
    ) -> None:
        count = features.shape[0]
        if features.dim() != 2 or features.shape[1] != self.embed_dim:
            raise ValueError(f"features must be (n, {self.embed_dim}), got {tuple(features.shape)}")
        if tokens is not None and tokens.shape[-1] != self.hidden_size:
            raise ValueError(f"the index stores tokens of size {self.hidden_size}, got {tokens.shape[-1]}")
        ids = list(range(len(self), len(self) + count)) if ids is None else list(ids)
        if len(ids) != count:
            raise ValueError(f"got {len(ids)} ids for {count} items")
        if self.sources is not None:
            if sources is None or len(sources) != count:
                what = "texts" if self.modality == "text" else "image paths (store_tokens=False)"
                raise ValueError(f"this index keeps the {what} of its items: pass one per item")
            self.sources.extend(sources)
        self._features.append(features)
        if self._tokens is not None:
            self._tokens.append(tokens)
            self._lengths.append(lengths)
            self._offsets = self._max_length = None
        self.ids.extend(ids)

    # ------------------------------------------------------------------------------------------
    # ITC: the FAISS index
    # ------------------------------------------------------------------------------------------

    def search_parameters(self, k: int) -> dict[str, int]:
        """The search settings a query of `k` uses: `nlist` and `nprobe` (IVF types), `ef_search` (HNSW) and
        `fetch` (how many candidates FAISS returns before the exact re-scoring cuts them to k).

        Defaults by gallery size: `nlist` the power of two nearest 4 sqrt(n), with at least 39 training points
        per list; `nprobe` nlist / 16 (at least 8): on 1M clustered random features (benchmarks/bench_index.py)
        that is 256 of 4096 lists, recall@128 1.0 in clusters of 500 and 0.95 in clusters of 100, at about 3%
        of the exact search's latency; HNSW searches 2k deep (at least 128); IVF-PQ fetches 4k candidates.
        """
        count = max(len(self), 1)
        nlist = 2 ** round(math.log2(max(4 * math.sqrt(count), 1)))
        nlist = max(1, min(nlist, count // _TRAIN_POINTS_PER_CENTROID))
        if self._itc is not None and self.index_type in ("ivf", "ivfpq"):
            nlist = _faiss().extract_index_ivf(self._itc).nlist  # what it was trained with
        fetch = min(len(self), k * (_PQ_REFINE_FACTOR if self.index_type == "ivfpq" else 1))
        return {
            "nlist": nlist,
            "nprobe": min(nlist, self.nprobe or max(8, nlist // 16)),
            "ef_search": max(self.ef_search or 2 * fetch, fetch, 128),
            "fetch": fetch,
        }

    def _itc_index(self):
        """The FAISS index, created, trained and brought up to date with the features on first need."""
        faiss = _faiss()
        if self._itc is None:
            self._itc = self._new_itc_index(faiss)
        features = self.features
        if not self._itc.is_trained:
            sample = features
            limit = _TRAIN_SAMPLE_PER_CENTROID * self.search_parameters(1)["nlist"]
            if len(sample) > limit:  # k-means time grows with its points, its quality hardly past ~64 each
                sample = sample[
                    torch.randperm(len(sample), generator=torch.Generator().manual_seed(0))[:limit]
                ]
            self._itc.train(np.ascontiguousarray(sample.numpy()))
        for start in range(self._itc.ntotal, len(features), _ADD_BLOCK):
            self._itc.add(np.ascontiguousarray(features[start : start + _ADD_BLOCK].numpy()))
        return self._itc

    def _new_itc_index(self, faiss):
        metric = faiss.METRIC_INNER_PRODUCT
        if self.index_type == "flat":
            return faiss.IndexFlatIP(self.embed_dim)
        if self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(self.embed_dim, _HNSW_NEIGHBOURS, metric)
            index.hnsw.efConstruction = 2 * _HNSW_NEIGHBOURS
            return index
        if len(self) == 0:
            raise ValueError(
                f"an {self.index_type} index is trained on its items: add items before searching"
            )
        nlist = self.search_parameters(1)["nlist"]
        if self.index_type == "ivf":
            return faiss.IndexIVFFlat(faiss.IndexFlatIP(self.embed_dim), self.embed_dim, nlist, metric)
        subquantizers = next(
            m
            for m in (self.embed_dim // 4, self.embed_dim // 2, self.embed_dim)
            if m and self.embed_dim % m == 0
        )
        if len(self) < _TRAIN_POINTS_PER_CENTROID * 256:
            raise ValueError(
                f"an ivfpq index trains 256 centroids per sub-vector and needs at least "
                f"{_TRAIN_POINTS_PER_CENTROID * 256} items; this gallery has {len(self)}: use 'ivf' or 'flat'"
            )
        return faiss.IndexIVFPQ(
            faiss.IndexFlatIP(self.embed_dim), self.embed_dim, nlist, subquantizers, 8, metric
        )

    @torch.no_grad()
    def search(self, query_feat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's ITC shortlist: `(similarities, positions)`, both `(num_queries, k')`, best first.

        FAISS proposes the candidates; their similarities are computed here from the stored features, as
        `query_feat @ features.T` would (in the dtype of `query_feat`). `k'` is `k` capped by the gallery size, or
        fewer where an approximate index found fewer candidates for some query (every row is cut to the shortest).
        """
        if len(self) == 0:
            raise ValueError("the index is empty")
        params = self.search_parameters(k)
        itc = self._itc_index()
        faiss = _faiss()
        if self.index_type in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(itc).nprobe = params["nprobe"]
        elif self.index_type == "hnsw":
            itc.hnsw.efSearch = params["ef_search"]
        _, labels = itc.search(
            np.ascontiguousarray(query_feat.detach().float().cpu().numpy()), params["fetch"]
        )
        candidates = torch.from_numpy(labels).to(query_feat.device)
        valid = candidates >= 0
        # the union of the shortlists in one matmul: the same products, bit for bit, as the dense ranking's
        union, inverse = candidates.clamp(min=0).unique(return_inverse=True)
        union_feat = self.features[union.cpu()].to(query_feat.device, query_feat.dtype)
        sims = (query_feat @ union_feat.T).gather(1, inverse).masked_fill(~valid, float("-inf"))
        keep = min(k, params["fetch"], int(valid.sum(dim=1).min()))
        if keep == 0:
            raise ValueError(
                f"the {self.index_type} index found no item for a query: search more of it (nprobe, ef_search)"
            )
        sims, order = sims.topk(keep, dim=1)
        return sims, candidates.gather(1, order)

    # ------------------------------------------------------------------------------------------
    # ITM: the token store
    # ------------------------------------------------------------------------------------------

    def item_tokens(
        self, positions: torch.Tensor, encode: Encoder | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token embeddings of the items at `positions` `(n,)`, padded to the longest stored text, and their
        mask (None for images); read from the store, or encoded again with `encode` (store_tokens=False)."""
        positions = positions.cpu()
        if not self.store_tokens:
            if encode is None:
                raise ValueError(
                    "this index keeps no tokens (store_tokens=False): pass the encoder to re-encode"
                )
            _, embeds, mask = encode([self.sources[p] for p in positions.tolist()], 0)
            return embeds, mask
        if self._offsets is None:
            lengths = self._lengths.all()[:, 0].long()
            self._offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        starts = self._offsets[positions]
        lengths = self._offsets[positions + 1] - starts
        # texts pad to the longest of the gallery, as a dense index of them would (the same matmul shapes)
        if self._max_length is None:
            self._max_length = int(self._offsets.diff().max())
        steps = torch.arange(self._max_length)
        mask = steps < lengths[:, None]
        rows = (starts[:, None] + steps).masked_fill(~mask, 0)
        embeds = self._tokens.all()[rows.reshape(-1)].reshape(
            len(positions), self._max_length, self.hidden_size
        )
        embeds = embeds.masked_fill(~mask[..., None], 0)
        return embeds, (mask.long() if self.modality == "text" else None)

    @torch.no_grad()
    def rerank(
        self,
        model: torch.nn.Module,
        query_embeds: torch.Tensor,
        query_feat: torch.Tensor,
        query_mask: torch.Tensor | None,
        k: int,
        batch_size: int,
        encode: Encoder | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ALBEF retrieval of a batch of queries: the ITC shortlist of `k` items, re-ranked by `model.itm_rerank`.

        Args:
            model: an ALBEF model with an ITM head.
            query_embeds, query_feat, query_mask: the queries' tokens, projected features and (texts) mask.
            k, batch_size: items shortlisted per query, and query-item pairs per ITM forward.
            encode: encodes gallery items again (an index without tokens).

        Returns:
            `(similarities, positions, itm_logits)`: `(num_queries, k')`, `(num_queries, k')`,
            `(num_queries, k', 2)`, in ITC order.
        """
        sims, candidates = self.search(query_feat, k)
        items, inverse = candidates.unique(return_inverse=True)
        item_embeds, item_mask = self.item_tokens(items, encode)
        item_embeds = item_embeds.to(query_embeds.device, query_embeds.dtype)
        # the queries' similarities to the union of their shortlists: -inf off each query's own shortlist
        local = sims.new_full((sims.shape[0], len(items)), float("-inf")).scatter_(1, inverse, sims)
        if self.query_modality == "image":
            images, texts, masks, image_queries = query_embeds, item_embeds, item_mask, True
            masks = masks.to(query_embeds.device)
        else:
            images, texts, masks, image_queries = item_embeds, query_embeds, query_mask, False
        itc, local_candidates, itm = model.itm_rerank(
            local, images, texts, masks, sims.shape[1], batch_size, image_queries
        )
        return itc, items.to(local_candidates.device)[local_candidates], itm

    # ------------------------------------------------------------------------------------------
    # Folders
    # ------------------------------------------------------------------------------------------

    def _file(self, name: str) -> str | None:
        return None if self.directory is None else os.path.join(self.directory, name)

    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "modality": self.modality,
            "count": len(self),
            "embed_dim": self.embed_dim,
            "hidden_size": self.hidden_size,
            "index_type": self.index_type,
            "token_dtype": str(self.token_dtype).removeprefix("torch."),
            "store_tokens": self.store_tokens,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "model_name": self.model_name,
            "ids": self.ids,
            "sources": self.sources,
        }

    def save(self, directory: str | os.PathLike | None = None) -> None:
        """Write the index to `directory` (created when missing; default: a folder index's own folder).

        The features and tokens are raw files (`features.bin` fp32, `tokens.bin` in `token_dtype`, `lengths.bin`
        int32), the FAISS index `itc.faiss`, the rest `index.json`, written last.
        """
        if directory is None:
            if self.directory is None:
                raise ValueError("an in-memory index saves to a folder: pass `directory`")
            directory = self.directory
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self._features.write(os.path.join(directory, FEATURES_FILE))
        if self._tokens is not None:
            self._tokens.write(os.path.join(directory, TOKENS_FILE))
            self._lengths.write(os.path.join(directory, LENGTHS_FILE))
        if len(self):
            _faiss().write_index(self._itc_index(), os.path.join(directory, ITC_FILE))
        _write_json(os.path.join(directory, INDEX_METADATA), self._metadata())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AlbefRetrievalIndex:
        """Open an index written by `save`: its features and tokens are memory-mapped, not read.

        Raises:
            ValueError: when `directory` holds no index, or one of an unknown format.
        """
        path = os.path.join(directory, INDEX_METADATA)
        if not os.path.isfile(path):
            raise ValueError(f"{str(directory)!r} holds no retrieval index ({INDEX_METADATA})")
        with open(path, encoding="utf-8") as file:
            metadata = json.load(file)
        if metadata.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"unknown retrieval index format {metadata.get('format_version')!r} in {directory}"
            )
        index = cls(
            metadata["modality"],
            metadata["embed_dim"],
            metadata["hidden_size"],
            directory=directory,
            index_type=metadata["index_type"],
            token_dtype=TOKEN_DTYPES[metadata["token_dtype"]],
            store_tokens=metadata["store_tokens"],
            nprobe=metadata["nprobe"],
            ef_search=metadata["ef_search"],
            model_name=metadata["model_name"],
        )
        count = metadata["count"]
        index.ids, index.sources = metadata["ids"], metadata["sources"]
        for rows in (index._features, index._tokens, index._lengths):
            if rows is not None:
                rows.count = count
        if index._tokens is not None:
            index._tokens.count = int(index._lengths.all().long().sum())
        itc_path = os.path.join(directory, ITC_FILE)
        if os.path.isfile(itc_path):
            index._itc = _faiss().read_index(itc_path)
            if index._itc.ntotal > count:
                raise ValueError(f"{itc_path} holds {index._itc.ntotal} items, the index {count}")
        return index


# ----------------------------------------------------------------------------------------------
# Building in chunks, resumable, across processes
# ----------------------------------------------------------------------------------------------


def build_retrieval_index(
    items: Sequence[Any],
    modality: str,
    encode: Encoder,
    embed_dim: int,
    hidden_size: int,
    ids: Sequence[Any] | None = None,
    directory: str | os.PathLike | None = None,
    batch_size: int = 32,
    chunk_size: int = 4096,
    progress: bool = True,
    **index_options: Any,
) -> AlbefRetrievalIndex:
    """Encode a gallery into an index, `batch_size` items per `encode` call.

    With a `directory`, the gallery is cut into chunks of `chunk_size` items, each written to
    `directory/chunks/` as it finishes; a build that is started again with the same gallery skips the finished
    chunks. In a process group (`torchrun`, `accelerate launch`) rank r encodes chunks r, r + world_size, ...;
    rank 0 then merges the chunks into the index (and removes them), and every rank returns the merged index.

    Args:
        items: the gallery (images or texts, as `encode` takes them).
        modality: `"image"` or `"text"`.
        encode: encodes a list of items (see `Encoder`).
        embed_dim, hidden_size: the model's ITC feature size and the items' token size.
        ids: one identifier per item (default: positions).
        directory: where a resumable (and shardable) build writes; None builds in memory, in one process.
        batch_size, chunk_size: items per `encode` call, and per chunk written.
        progress: show a progress bar.
        **index_options: `AlbefRetrievalIndex` options (`index_type`, `token_dtype`, `store_tokens`, `nprobe`,
            `ef_search`, `model_name`).

    Raises:
        ValueError: for a folder that holds another gallery's build or index, or a process group without a
            folder.
    """
    items = list(items)
    ids = list(range(len(items))) if ids is None else list(ids)
    rank, world_size = _rank_and_world()
    if directory is None:
        if world_size > 1:
            raise ValueError(
                "a build across processes writes its chunks to a shared folder: pass `directory`"
            )
        index = AlbefRetrievalIndex(modality, embed_dim, hidden_size, **index_options)
        with _progress_bar(len(items), 0, progress, "encoding the gallery") as bar:
            _encode_into(index._append, items, ids, 0, encode, batch_size, modality, index.store_tokens, bar)
        return index

    directory = os.fspath(directory)
    chunks = os.path.join(directory, CHUNKS_FOLDER)
    manifest = {
        "modality": modality,
        "count": len(items),
        "chunk_size": chunk_size,
        "ids": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        **{key: str(value) for key, value in sorted(index_options.items())},
    }
    done = os.path.join(directory, INDEX_METADATA)
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as file:
            if json.load(file).get("build") == manifest:
                return AlbefRetrievalIndex.load(directory)
        raise ValueError(f"{directory} already holds another retrieval index; build into another folder")
    os.makedirs(chunks, exist_ok=True)
    manifest_path = os.path.join(chunks, BUILD_MANIFEST)
    if not os.path.isfile(manifest_path):
        _write_json(manifest_path, manifest)
    with open(manifest_path, encoding="utf-8") as file:
        if json.load(file) != manifest:
            raise ValueError(
                f"{chunks} holds an unfinished build of another gallery or with other options; delete it to "
                "start over"
            )

    store_tokens = index_options.get("store_tokens", True)
    starts = range(rank * chunk_size, len(items), world_size * chunk_size)
    paths = {start: os.path.join(chunks, f"chunk-{start // chunk_size:06d}.safetensors") for start in starts}
    pending = [start for start in starts if not os.path.isfile(paths[start])]
    mine = sum(min(chunk_size, len(items) - start) for start in starts)
    todo = sum(min(chunk_size, len(items) - start) for start in pending)
    with _progress_bar(mine, mine - todo, progress, f"encoding the gallery (rank {rank})") as bar:
        for start in pending:
            parts: dict[str, list[torch.Tensor]] = {"features": [], "tokens": [], "lengths": []}

            def keep(features, tokens, lengths, _ids, _sources, parts=parts):
                for name, value in (("features", features), ("tokens", tokens), ("lengths", lengths)):
                    if value is not None:
                        parts[name].append(value.detach().cpu())

            chunk = items[start : start + chunk_size]
            _encode_into(keep, chunk, ids, start, encode, batch_size, modality, store_tokens, bar)
            tensors = {name: torch.cat(values).contiguous() for name, values in parts.items() if values}
            if "tokens" in tensors:
                tensors["tokens"] = tensors["tokens"].to(index_options.get("token_dtype") or torch.float16)
            # written whole, then renamed: a chunk file that exists is complete
            save_file(tensors, paths[start] + ".tmp")
            os.replace(paths[start] + ".tmp", paths[start])
    _barrier(world_size)
    if rank == 0:
        index = AlbefRetrievalIndex(modality, embed_dim, hidden_size, directory=directory, **index_options)
        for start in range(0, len(items), chunk_size):
            tensors = load_file(os.path.join(chunks, f"chunk-{start // chunk_size:06d}.safetensors"))
            stop = start + len(tensors["features"])
            index._append(
                tensors["features"],
                tensors.get("tokens"),
                tensors.get("lengths"),
                ids[start:stop],
                items[start:stop] if index.sources is not None else None,
            )
        metadata = index._metadata()
        index.save()
        # the build's manifest in the metadata lets a restarted job recognise its finished index
        _write_json(done, {**metadata, "build": manifest})
        shutil.rmtree(chunks)
    _barrier(world_size)
    return AlbefRetrievalIndex.load(directory)


def _encode_into(
    sink: Callable[..., None],
    items: list[Any],
    ids: list[Any],
    start: int,
    encode: Encoder,
    batch_size: int,
    modality: str,
    store_tokens: bool,
    bar,
) -> None:
    """Encode `items` (the gallery's from item `start` on) in batches and pass each batch's features, flat tokens,
    lengths, ids and sources to `sink`."""
    for offset in range(0, len(items), batch_size):
        batch = items[offset : offset + batch_size]
        features, embeds, mask = encode(batch, start + offset)
        tokens = lengths = None
        if store_tokens:
            tokens, lengths = _flatten_tokens(embeds, mask, modality)
        sink(features, tokens, lengths, ids[start + offset : start + offset + len(batch)], batch)
        bar.update(len(batch))


def _flatten_tokens(
    embeds: torch.Tensor, attention_mask: torch.Tensor | None, modality: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real tokens of each item, concatenated `(total_tokens, hidden)`, and their counts `(n, 1)`."""
    count, length = embeds.shape[:2]
    if attention_mask is None:
        if modality == "text":
            raise ValueError("text tokens need their attention mask")
        return embeds.reshape(-1, embeds.shape[-1]), torch.full((count, 1), length, dtype=torch.int32)
    lengths = attention_mask.sum(dim=1)
    if not torch.equal(attention_mask.bool(), torch.arange(length, device=lengths.device) < lengths[:, None]):
        raise ValueError("the token store takes right-padded texts (a mask of ones, then zeros)")
    return embeds[attention_mask.bool()], lengths.to(torch.int32)[:, None].cpu()


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: from the process group, else one process.

    Raises:
        ValueError: when launched on several processes (WORLD_SIZE) without a process group to meet in.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "launched on several processes but no process group is initialised: call "
            "torch.distributed.init_process_group() (or create an accelerate Accelerator) before building"
        )
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def _progress_bar(total: int, done: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not enabled, desc=description, unit="item")


def _write_json(path: str, value: Any) -> None:
    """Write `value` to `path` whole or not at all (a temporary file of this process, then renamed: the ranks
    of a build may write the same file at once)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(value, file)
    os.replace(temporary, path)
