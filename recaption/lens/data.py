"""The corpus as training batches: stream `data/*.parquet`, shuffle, pick a caption, decode.

No torch here: batches are numpy arrays, so the data side can be read, tested and reused
without the trainer's dependencies.

Memory is bounded by the shuffle buffer plus one row group. Each epoch visits the row groups
in a seeded random order and shuffles rows through the buffer; every draw (order, caption
source, caption dropout) comes from generators seeded by (seed, epoch), so a stream position
is just `(epoch, consumed)`. Resuming replays the epoch up to that position without
decoding a single image.
"""

from __future__ import annotations

import io
import queue
import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from recaption.corpus import DATA_DIR, Committed, CorpusStore
from recaption.errors import ConfigError
from recaption.lens.config import SOURCE_COLUMNS, DataConfig

T = TypeVar("T")
DROPPED = "dropped"  # the caption-dropout "source": an empty caption, for CFG


@dataclass
class Batch:
    images: np.ndarray  # uint8 [B, H, W, 3]
    captions: list[str]
    sources: list[str]  # "dense" | "short" | "alt" | "dropped", per row
    state: dict  # the stream position after this batch (resume from here), sources drawn


@dataclass
class _Row:
    image: bytes
    captions: dict[str, str]  # source -> text


@dataclass
class CorpusStream:
    corpus: str
    data: DataConfig
    image_size: int
    seed: int = 0
    epoch: int = 0
    consumed: int = 0  # rows taken from the current epoch
    drawn: Counter = field(default_factory=Counter)  # caption sources drawn so far

    def __post_init__(self) -> None:
        store = CorpusStore(self.corpus)  # a local path or any URI the pipeline writes to
        self.fs = store.arrow_fs
        files = store.shard_files(DATA_DIR)
        manifest = store.load_manifest()
        if manifest is not None:  # a recaption corpus: its committed shards, none mid-write
            committed = Committed.read(store, manifest).ids
            files = {sid: path for sid, path in files.items() if sid in committed}
        self.files = list(files.values())
        if not self.files:
            raise ConfigError(
                f"no corpus shards in {self.corpus}/data (make one with `recaption run`)"
            )
        self.sources = [s for s, share in self.data.caption_mix.items() if share > 0]
        self.weights = [self.data.caption_mix[s] for s in self.sources]
        self.columns = ["image", *(SOURCE_COLUMNS[s] for s in self.sources)]
        self.row_groups: list[tuple[str, int, int]] = []  # (file, row group, rows)
        for path in self.files:
            meta = self._parquet(path).metadata
            names = set(meta.schema.names)
            if missing := [c for c in self.columns if c not in names]:
                hint = " (the corpus was written with output.store_images=false)"
                raise ConfigError(
                    f"{path} lacks column(s) {', '.join(missing)}"
                    + (hint if "image" in missing else "")
                )
            for g in range(meta.num_row_groups):
                if rows := meta.row_group(g).num_rows:
                    self.row_groups.append((path, g, rows))
        self.rows = sum(r for *_, r in self.row_groups)
        if not self.rows:
            raise ConfigError(f"the corpus at {self.corpus} has no captioned rows")

    def _parquet(self, path: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.fs.open_input_file(path))

    # -- the shuffled row order ---------------------------------------------------------------

    def _epoch_rows(self, epoch: int, skip: int) -> Iterator[_Row | None]:
        """The epoch's rows in shuffled order. The first `skip` come back as None and are
        never read: until then the buffer holds (group, row) references, and only the rows
        still in it are fetched when the skip ends."""
        rng = random.Random(f"order-{self.seed}-{epoch}")
        groups = list(self.row_groups)
        rng.shuffle(groups)
        size = self.data.shuffle_buffer
        buffer: list[_Row | tuple[int, int]] = []
        emitted = 0
        for gi, (*_, n) in enumerate(groups):
            rows = self._read_group(groups[gi]) if emitted >= skip else None
            for ri in range(n):
                entry = rows[ri] if rows is not None else (gi, ri)
                if len(buffer) < size:
                    buffer.append(entry)
                    continue
                j = rng.randrange(size)
                taken, buffer[j] = buffer[j], entry
                emitted += 1
                if emitted > skip:
                    yield taken
                    continue
                yield None
                if emitted == skip:
                    rows = self._fetch(buffer, groups, also=gi)
        rng.shuffle(buffer)
        if emitted < skip:
            self._fetch(buffer, groups)
        for taken in buffer:
            emitted += 1
            yield taken if emitted > skip else None

    def _fetch(
        self, buffer: list, groups: list[tuple[str, int, int]], also: int | None = None
    ) -> list[_Row] | None:
        """Replace (group, row) references in the buffer by the rows, one group at a time;
        returns the rows of group `also` (the one being read on), read once with the rest."""
        refs: dict[int, list[int]] = {} if also is None else {also: []}
        for k, entry in enumerate(buffer):
            if isinstance(entry, tuple):
                refs.setdefault(entry[0], []).append(k)
        current = None
        for gi, slots in refs.items():
            rows = self._read_group(groups[gi])
            for k in slots:
                buffer[k] = rows[buffer[k][1]]
            if gi == also:
                current = rows
        return current

    def _read_group(self, group: tuple[str, int, int]) -> list[_Row]:
        path, g, _ = group
        table = self._parquet(path).read_row_group(g, columns=self.columns)
        cols = {name: table.column(name).to_pylist() for name in self.columns}
        return [
            _Row(
                image=image,
                captions={s: cols[SOURCE_COLUMNS[s]][i] or "" for s in self.sources},
            )
            for i, image in enumerate(cols["image"])
        ]

    # -- examples -----------------------------------------------------------------------------

    def examples(self) -> Iterator[tuple[np.ndarray, str, str]]:
        """(image, caption, source) forever, epoch after epoch, from the current position.
        An image that does not decode is skipped and counted in `drawn["undecodable"]`."""
        while True:
            caption_rng = random.Random(f"caption-{self.seed}-{self.epoch}")
            skip = self.consumed
            for n, row in enumerate(self._epoch_rows(self.epoch, skip)):
                source = caption_rng.choices(self.sources, self.weights)[0]
                dropped = caption_rng.random() < self.data.caption_dropout
                if n < skip:
                    continue  # replayed draws: the generators stay in step
                self.consumed += 1
                try:
                    image = decode(row.image, self.image_size)
                except (OSError, ValueError, Image.DecompressionBombError):
                    self.drawn["undecodable"] += 1
                    continue
                source = DROPPED if dropped else source
                self.drawn[source] += 1
                yield image, ("" if dropped else row.captions[source]), source
            self.epoch, self.consumed = self.epoch + 1, 0

    def batches(self, batch_size: int) -> Iterator[Batch]:
        it = self.examples()
        while True:
            items = [next(it) for _ in range(batch_size)]
            images = np.stack([img for img, _, _ in items])
            yield Batch(
                images=images,
                captions=[c for _, c, _ in items],
                sources=[s for _, _, s in items],
                state={"epoch": self.epoch, "consumed": self.consumed, "drawn": dict(self.drawn)},
            )


def decode(data: bytes, size: int) -> np.ndarray:
    """Corpus image bytes -> uint8 [size, size, 3]. The whole frame is kept (stretched, not
    cropped): captions describe positions in the full frame ("in the top left")."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale, far faster
    im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return np.asarray(im)


def prefetch(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """Run `items` in a background thread, `depth` ahead (PIL decodes without the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True, name="lens-data")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
