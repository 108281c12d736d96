"""Metrics of saliency maps: faithfulness, localisation, fidelity and sanity.

* :func:`average_drop_increase`: Average Drop % and Increase in Confidence % (Chattopadhyay
  et al. 2018; Wang et al. 2020 Table 1), :mod:`.confidence`.
* :func:`deletion`, :func:`insertion`, :func:`deletion_insertion`: causal AUCs (Petsiuk et
  al. 2018; Wang et al. 2020 Table 3), :mod:`.causal`.
* :func:`energy_pointing_game`: share of the map's energy in a bounding box (Wang et al.
  2020 Table 2), :mod:`.localisation`.
* :func:`topk_fidelity`: Pearson r of the top-k-channel map against the full Score-CAM map,
  from a cache, :mod:`.fidelity`.
* :func:`sanity_check`: cascading model parameter randomisation (Adebayo et al. 2018),
  :mod:`.sanity`.

Every result carries its protocol (a JSON attribute) and the forward passes it cost.
"""

from scorecam_explorer.errors import BoxError
from scorecam_explorer.metrics.causal import deletion, deletion_insertion, insertion
from scorecam_explorer.metrics.confidence import average_drop_increase
from scorecam_explorer.metrics.fidelity import topk_fidelity
from scorecam_explorer.metrics.localisation import energy_pointing_game
from scorecam_explorer.metrics.sanity import cascade_groups, sanity_check

__all__ = [
    "BoxError",
    "average_drop_increase",
    "cascade_groups",
    "deletion",
    "deletion_insertion",
    "energy_pointing_game",
    "insertion",
    "sanity_check",
    "topk_fidelity",
]
