"""The torch-op path: the loss families in fused torch ops on cache-sized blocks of rows.

It runs on any device and under ``torch.compile``, computes every option, and is the fallback of
the native and Triton backends (where no C compiler is available, or for a call outside their
allow-lists). :mod:`.softmax` and :mod:`.binary` are the two families, :mod:`.linear` the
chunked linear + cross-entropy; their coefficients come from :mod:`crossent._formula`.
"""
