"""Tests of cbmir.locations: the stored text of a location is exactly what indexes have always held, it parses
back to the same location, bad text is a `LocationError` naming the text, and the pixels are read from both
kinds."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from cbmir.datasets import Record, load_pixels, read_medmnist, read_pixels
from cbmir.errors import CbmirError
from cbmir.imaging.io import ImageTooLargeError
from cbmir.locations import ArchiveMember, Location, LocationError, PacsInstance


def test_file_location_text_round_trip_and_name(tmp_path):
    record = Record("a", tmp_path / "scans" / "a b#1.png", ("x",), "set", "train")
    location = Location.of(record)
    assert str(location) == (tmp_path / "scans" / "a b#1.png").as_posix()
    assert Location.parse(str(location)) == location
    assert (location.kind, location.is_file, location.name) == ("file", True, "a b#1.png")


def test_file_locations_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(Location.of(Record("a", Path("images/a.png"), (), "set"))) == f"{tmp_path.as_posix()}/images/a.png"
    # Indexes written before the paths were made absolute still parse.
    assert Location.parse("images/a.png").path == Path("images/a.png")


def test_member_location_text_round_trip_and_name(tmp_path):
    record = Record("validation-12", tmp_path / "pneumoniamnist.npz", ("1",), "pneumoniamnist", "validation", 12)
    location = Location.of(record)
    assert location == Location(tmp_path / "pneumoniamnist.npz", ArchiveMember("validation", 12))
    assert str(location) == f"{(tmp_path / 'pneumoniamnist.npz').as_posix()}#validation/12"
    assert Location.parse(str(location)) == location
    assert (location.kind, location.is_file, location.name) == ("member", False, "pneumoniamnist.npz#validation/12")
    # The member follows the last "#": an archive in a folder with "#" in its name.
    assert Location.parse("/data/set#2/a.npz#test/0") == Location(Path("/data/set#2/a.npz"), ArchiveMember("test", 0))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("/data/a.npz#valid/3", "archive member split 'valid' is not one of train, validation, test"),
        ("#train/3", "no file path"),
    ],
)
def test_parse_errors_name_the_text_and_the_reason(text, reason):
    with pytest.raises(LocationError, match=f"^location {text!r}: {reason}"):
        Location.parse(text)
    assert issubclass(LocationError, CbmirError)


def test_locations_that_could_not_be_stored_unambiguously_are_refused(tmp_path):
    with pytest.raises(LocationError, match="ends like an archive member"):
        Location(Path("/data/scan#test/3"))
    with pytest.raises(LocationError, match="split 'dev'"):
        ArchiveMember("dev", 1)  # type: ignore[arg-type]
    with pytest.raises(LocationError, match="index -1"):
        ArchiveMember("test", -1)
    with pytest.raises(LocationError, match="array index but no split"):
        Location.of(Record("x", tmp_path / "a.npz", (), "set", index=3))


def test_read_pixels_of_a_file_and_of_an_archive_member(tmp_path):
    image = np.arange(48, dtype=np.uint8).reshape(6, 8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    location = Location.parse((tmp_path / "a.png").as_posix())
    np.testing.assert_array_equal(read_pixels(location), image)
    with pytest.raises(ImageTooLargeError, match="a.png"):
        read_pixels(location, max_pixels=47)

    images = np.stack([image, image[::-1]])
    npz = tmp_path / "tiny.npz"
    np.savez(npz, train_images=images, train_labels=np.zeros((2, 1), np.uint8))
    member = Location.parse(f"{npz.as_posix()}#train/1")
    np.testing.assert_array_equal(read_pixels(member), image[::-1])
    record = read_medmnist(npz).records[1]
    assert Location.of(record) == member
    np.testing.assert_array_equal(load_pixels(record), image[::-1])


def test_pacs_location_text_round_trip_and_name():
    location = Location.pacs("http://pacs:8042/dicom-web/", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    text = "dicomweb+http://pacs:8042/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
    assert str(location) == text and Location.parse(text) == location
    assert (location.kind, location.is_file, location.name) == ("pacs", False, "1.2.3.4.5")
    assert location.instance is not None and location.instance.server == "http://pacs:8042/dicom-web"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("dicomweb+http://pacs/dicom-web/studies/1.2/series/1.3", "not a DICOMweb instance URL"),
        ("dicomweb+http://pacs/studies/1.2/series/x.3/instances/1.4", "not a DICOMweb instance URL"),
        ("dicomweb+http://alice:secret@pacs/studies/1.2/series/1.3/instances/1.4", "without credentials"),
        ("dicomweb+ftp://pacs/studies/1.2/series/1.3/instances/1.4", "not a DICOMweb instance URL"),
    ],
)
def test_bad_pacs_location_text_is_refused_naming_it(text, reason):
    with pytest.raises(LocationError, match=reason) as caught:
        Location.parse(text)
    assert text.replace("alice:secret", "***") in str(caught.value) and "secret" not in str(caught.value)


def test_a_pacs_uid_must_be_a_dicom_uid():
    with pytest.raises(LocationError, match="instance UID '1.2.abc'"):
        Location.pacs("http://pacs/dicom-web", "1.2", "1.3", "1.2.abc")
    with pytest.raises(LocationError, match="study UID"):
        Location.pacs("http://pacs/dicom-web", "1." * 40, "1.3", "1.4")
    with pytest.raises(LocationError, match="no file path"):
        Location(instance=PacsInstance("http://pacs", "1", "2", "3"), path=Path("/a.png"))
