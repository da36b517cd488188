"""Weight sharing: k-means codebooks (``kmeans``) and centroid fine-tuning (``finetune``)."""

from jcompress.sharing.finetune import CentroidState, centroid_finetune, centroid_gradients, codebook_aux
from jcompress.sharing.kmeans import INITS, KMeansResult, kmeans, kmeans_1d, reconstruct

__all__ = [
    "INITS",
    "CentroidState",
    "KMeansResult",
    "centroid_finetune",
    "centroid_gradients",
    "codebook_aux",
    "kmeans",
    "kmeans_1d",
    "reconstruct",
]
