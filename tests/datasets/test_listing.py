"""Tests of cbmir.imaging.listing, the one image-file lister the dataset readers, the CLI and the indexer share
(here beside the readers, its main users)."""

from pathlib import Path

from cbmir.imaging.listing import IMAGE_SUFFIXES, image_files, images_in, is_image, subfolders, walk_files


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"placeholder")
    return path


def test_image_suffixes_cover_every_readable_format_including_dicom():
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"} == IMAGE_SUFFIXES
    assert all(is_image(Path(f"scan{suffix.upper()}")) for suffix in IMAGE_SUFFIXES)
    assert not is_image(Path("notes.txt")) and not is_image(Path("png"))


def test_image_files_sorted_recursive_skipping_hidden_files_and_folders(tmp_path):
    root = tmp_path / ".cache" / "archive"  # a hidden root is still listed: only names below it count
    wanted = [touch(root / name) for name in ("a.PNG", "b/c.dicom", "b/d/e.Dcm", "f.jpeg")]
    for name in (".hidden.png", "._a.png", ".git/x.png", "b/.thumbs/y.jpg", "notes.txt", "b/DICOMDIR"):
        touch(root / name)
    assert image_files(root) == sorted(wanted)
    assert walk_files(root) == sorted([*wanted, root / "notes.txt", root / "b" / "DICOMDIR"])
    assert image_files(tmp_path / "absent") == []


def test_images_in_and_subfolders_look_one_level_down(tmp_path):
    top = [touch(tmp_path / "b.png"), touch(tmp_path / "a.tif")]
    touch(tmp_path / ".c.png")
    touch(tmp_path / "sub" / "d.png")
    (tmp_path / ".hidden").mkdir()
    assert images_in(tmp_path) == sorted(top)
    assert subfolders(tmp_path) == [tmp_path / "sub"]
