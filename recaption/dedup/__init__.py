"""Never pay twice for the same picture: the run's duplicate index.

    fingerprint(image)   sha256 (exact) + phash (the near-search key) + dhash (a second opinion)
    DedupIndex           the index itself, pure logic in one process (also a partition's state)
    SharedIndex          what workers hold: one local DedupIndex, or N partition actors
                         (and, searching near copies, one `Recent` actor: the run's newest
                         originals, so two near copies claimed at once are not both paid)

An image is an exact duplicate of the first image with the same bytes (one partition owns
each sha, so that is exactly once per run), and a near duplicate of a stored original whose
phash AND dhash are both within `max_distance` bits, provided both images carry enough detail
for a 64-bit hash to mean something (`Fingerprint.near_ok`): flat graphics (banners, logos,
the procedural scenes) are matched exactly only, because distinct flat images share hashes.
"""

from recaption.dedup.fingerprint import Fingerprint, fingerprint
from recaption.dedup.index import Claim, DedupIndex
from recaption.dedup.shared import SharedIndex

__all__ = ["Claim", "DedupIndex", "Fingerprint", "SharedIndex", "fingerprint"]
