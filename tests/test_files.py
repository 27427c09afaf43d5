"""files.py: a file is replaced whole or not at all, nothing half-written is left, and it gets the umask."""
import os
import stat

import pytest

from compilers.files import replacing, staging_dir, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]


def test_files_and_staging_directories_get_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "sub" / "a.txt", "x")          # parents are made too
        staged = staging_dir(tmp_path, ".stage-")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sub" / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE(staged.stat().st_mode) == 0o750 and staged.name.startswith(".stage-")
