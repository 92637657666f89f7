"""The original's semantic relevance, the dense way: a dense TF-IDF matrix, image means, one dense product.

M[i, j] = c_i . t_j with t_j caption j's l2-normalised TF-IDF row (smooth idf: ln((1 + n) / (1 + df)) + 1)
and c_i the mean of image i's 5 rows. Only CountVectorizer is borrowed (for its tokenisation); the
weighting is written out in numpy so that it checks daa_loss.SemanticRelevance independently. Memory is
n_captions x vocabulary floats: fine for tests, ~100 GB for COCO train (the reason for the sparse version).
"""
import numpy as np
from sklearn.feature_extraction.text import CountVectorizer


def relevance_dense(captions, captions_per_image=5):
    """float64 (n_captions // captions_per_image, n_captions) relevance of every image to every caption."""
    counts = CountVectorizer().fit_transform(captions).toarray().astype(np.float64)  # (n_caps, V)
    n = counts.shape[0]
    df = (counts > 0).sum(axis=0)
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    tfidf = counts * idf
    tfidf /= np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-300)
    image_rows = tfidf.reshape(n // captions_per_image, captions_per_image, -1).mean(axis=1)
    return image_rows @ tfidf.T
