"""What every room of the gallery package shares: the gallery directory's file names, its errors, and the
family member a gallery is embedded by."""
from __future__ import annotations

from hetero.errors import ManifestError
from hetero.family import FamilyStore, MemberRecord

GALLERY = "gallery.json"
FORMAT = "hetero-gallery/1"
INDEX_FILE = "index.faiss"


class GalleryError(ManifestError):
    """A gallery that cannot be built or searched as asked, with a message for people."""


class SpaceMismatch(GalleryError):
    """A query model from another embedding space than the gallery's."""


def member_record(store: FamilyStore, member: str | None) -> MemberRecord:
    if member is None:
        return store.cloud
    try:
        return store.member(member)
    except ManifestError as err:
        raise GalleryError(f"--member: {err}") from None
