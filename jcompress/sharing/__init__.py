"""Weight sharing: k-means codebooks (``kmeans``) and centroid fine-tuning (``finetune``)."""

from jcompress.sharing.finetune import CentroidState, centroid_finetune, centroid_gradients, sharing_aux
from jcompress.sharing.kmeans import INITS, KMeansResult, SharingAux, kmeans_1d, kmeans_share, reconstruct

__all__ = [
    "INITS",
    "CentroidState",
    "KMeansResult",
    "SharingAux",
    "centroid_finetune",
    "centroid_gradients",
    "kmeans_1d",
    "kmeans_share",
    "reconstruct",
    "sharing_aux",
]
