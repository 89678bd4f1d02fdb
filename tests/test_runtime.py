"""perceiver_fast.runtime: device resolution, output-folder checks and atomic writes."""
import os

import pytest

from perceiver_fast.runtime import atomic_write, check_output_dir, resolve_device


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
    atomic_write(str(path), lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]


def test_check_output_dir_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_dir(str(target)) == str(target)
    assert not (tmp_path / "a").exists()
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(ValueError, match="out .* exists and is not a folder"):
        check_output_dir(str(afile))
    with pytest.raises(ValueError, match="is not a folder"):
        check_output_dir(str(afile / "below"))
    with pytest.raises(ValueError, match="out must be a folder path"):
        check_output_dir("")


@pytest.mark.parametrize("arg,match", [("tpu", "is not a device"), ("meta", "only cpu and cuda")])
def test_resolve_device_names_the_argument(arg, match):
    with pytest.raises(ValueError, match=f"--device .*{match}"):
        resolve_device(arg, name="--device")
    assert resolve_device("cpu").type == "cpu"
