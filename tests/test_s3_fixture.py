import fsspec


def test_s3_server_round_trip(s3_bucket):
    url = f"s3://{s3_bucket}/dir/hello.txt"
    with fsspec.open(url, "wb") as f:
        f.write(b"hello")
    with fsspec.open(url, "rb") as f:
        assert f.read() == b"hello"
    fs, path = fsspec.core.url_to_fs(f"s3://{s3_bucket}/dir")
    assert fs.ls(path) == [f"{s3_bucket}/dir/hello.txt"]
