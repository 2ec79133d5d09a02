"""Small shard datasets for the data tests: tiny JPEGs, uneven shards, an index, and sidecars with the per-sample
byte offsets as prepare writes them (or none, as an older prepare left them)."""
import io
import json

import fsspec
from PIL import Image

from data.index import DatasetIndex, ShardInfo, SplitIndex, sidecar_url, write_index
from data.shards import ShardWriter


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12 + i % 5, 10 + i % 3), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def image(i: int, corrupt: set[int], truncated: set[int]) -> bytes:
    if i in corrupt:
        return b"\xff\xd8 broken"  # no frame header: its size cannot be read
    return jpeg(i)[:-20] if i in truncated else jpeg(i)  # truncated: the header reads, the decode fails


def build(url: str, sizes: list[int], split: str = "train", corrupt: set[int] = frozenset(),
          labels: bool = True, sidecars: bool = False, truncated: set[int] = frozenset()) -> list[str]:
    """Write shards of the given sizes and an index; returns every key in index order. Keys are s0000, s0001,
    ... in index order, labels key number % 5. With `sidecars`, each shard gets its offsets sidecar."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(f"{root}/{split}", exist_ok=True)
    shards, keys, i = [], [], 0
    for n, size in enumerate(sizes):
        name = f"{split}/{split}-{n:06d}.tar"
        buf = io.BytesIO()
        w = ShardWriter(buf)
        for _ in range(size):
            key = f"s{i:04d}"
            members = {"jpg": image(i, corrupt, truncated)}
            if labels:
                members["cls"] = str(i % 5).encode()
            members["json"] = json.dumps({"key": key}).encode()
            w.write(key, members)
            keys.append(key)
            i += 1
        nbytes, sha = w.close()
        fs.pipe_file(f"{root}/{name}", buf.getvalue())
        if sidecars:
            meta = {"name": name, "samples": size, "bytes": nbytes, "sha256": sha, "offsets": w.offsets, "end": w.end}
            fs.makedirs(sidecar_url(root, name).rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(sidecar_url(root, name), json.dumps(meta).encode())
        shards.append(ShardInfo(name, size, nbytes, sha))
    write_index(url, DatasetIndex([f"n{c:08d}" for c in range(5)], list("abcde"),
                                  {split: SplitIndex(shards, sum(sizes))}))
    return keys
