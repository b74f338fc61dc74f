"""Searching by an image on the PACS: the instance its UIDs name is fetched from the configured DICOMweb server
(`cbmir.pacs`, with the service's PACS settings), then read and searched as an uploaded DICOM file is
(`Catalog.search_image`, in one of the decoding slots).

The fetch happens outside the decoding slots: it waits on the network, as the arrival of an upload's body
does, and must not hold up the decoding of other queries meanwhile.

Every failure is a domain error whose message names the instance's UIDs and the reason, which
`cbmir.service.errors` maps to a status: no PACS configured (`PacsNotConfiguredError`), the PACS's own
errors (`cbmir.pacs.PacsError` and its kinds, re-raised with the UIDs in front), and an instance that holds
no image the service can search by (`UnusableInstanceError`: not an image, several frames, no decoder).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from cbmir.errors import CbmirError
from cbmir.imaging.io import ImageReadError
from cbmir.index import Filters
from cbmir.locations import PacsInstance
from cbmir.pacs import PacsError, PacsSettings, pacs_client
from cbmir.refine import Feedback, Region
from cbmir.search import SearchResult
from cbmir.service.catalog import Catalog, Decoded


class PacsNotConfiguredError(CbmirError):
    """A search by PACS image on a server that has no PACS (no ``CBMIR_PACS_URL``)."""


class UnusableInstanceError(CbmirError):
    """A PACS instance that holds no image to search by: a report, several frames, pixels no decoder reads, an
    image above the size limit. Unlike an upload (415, 413), the request itself was well formed."""


def instance_name(study: str, series: str, instance: str) -> str:
    """How messages name a PACS instance: all three UIDs, as a PACS user finds it again."""
    return f"PACS instance {instance} (study {study}, series {series})"


def fetch(settings: PacsSettings, study: str, series: str, instance: str) -> Dataset:
    """The instance's data set from the PACS at ``settings.pacs_url``."""
    name = instance_name(study, series, instance)
    if settings.pacs_url is None:
        raise PacsNotConfiguredError(f"{name}: this server has no PACS to fetch it from (CBMIR_PACS_URL is not set)")
    try:
        return pacs_client(settings.pacs_url, settings).fetch(PacsInstance(settings.pacs_url, study, series, instance))
    except PacsError as error:  # the same kind (it gives the status), named by all three UIDs
        raise type(error)(f"{name}: {error}") from None


def search_instance(
    catalog: Catalog,
    settings: PacsSettings,
    study: str,
    series: str,
    instance: str,
    k: int,
    filters: Filters,
    *,
    region: Region | None = None,
    feedback: Feedback | None = None,
) -> tuple[Decoded, SearchResult]:
    """A PACS instance as decoded, and the prediction and k nearest images of it (or of its `region`), refined
    by `feedback`: what `Catalog.search_image` answers for an upload."""
    dataset = fetch(settings, study, series, instance)
    try:
        return catalog.search_image(
            instance_name(study, series, instance), dataset, k, filters, region=region, feedback=feedback
        )
    except ImageReadError as error:
        raise UnusableInstanceError(str(error)) from None
