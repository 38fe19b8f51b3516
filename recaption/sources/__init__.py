"""Shard readers: an input folder as shards, a shard as a stream of samples.

base.py        Shard, Sample, Columns          listing.py  list, select, read a shard
webdataset.py  img2dataset tars and files      parquet.py  parquet tables (img2dataset, HF)
folder.py      a plain folder of images
"""

from recaption.errors import InputError
from recaption.sources.base import IMAGE_EXTENSIONS, Columns, Sample, Shard, status_error
from recaption.sources.listing import input_shards, list_shards, read_samples

__all__ = [
    "IMAGE_EXTENSIONS",
    "Columns",
    "InputError",
    "Sample",
    "Shard",
    "input_shards",
    "list_shards",
    "read_samples",
    "status_error",
]
