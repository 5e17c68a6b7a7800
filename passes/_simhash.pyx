# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The hot loop of LSH merging, in Cython: walk the channels by priority, look each one up in
every hash table (binary search in the sorted bucket codes) and pull in the unassigned bucket
mates whose cosine similarity reaches the threshold.

``lsh_merge.greedy_cluster_numpy`` is the reference with the same semantics; the tests check
that both give the same labels.
"""

import numpy as np

ctypedef unsigned long long u64
ctypedef long long i64


cdef inline Py_ssize_t _lower_bound(const u64[::1] sorted_codes, u64 key) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = sorted_codes.shape[0], mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if sorted_codes[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


def greedy_cluster(const u64[:, ::1] sorted_codes, const i64[:, ::1] sorted_index,
                   const u64[:, ::1] query_codes, const double[:, ::1] unit,
                   const i64[::1] order, double threshold, i64 max_merges):
    """Cluster labels (0, 1, ... in seed order) and the number of similarities computed.

    sorted_codes[t] / sorted_index[t]: table t's codes in ascending order and the channel at
    each position; query_codes[t, i]: the bucket channel i looks up in table t; unit: the
    channels' unit vectors; order: seeds by priority; at most max_merges channels join a
    cluster other than their own.
    """
    cdef Py_ssize_t n = unit.shape[0], dim = unit.shape[1], tables = sorted_codes.shape[0]
    labels_array = np.full(n, -1, dtype=np.int64)
    cdef i64[::1] labels = labels_array
    cdef i64 clusters = 0, merges = 0, comparisons = 0
    cdef Py_ssize_t k, t, p, d, i, j
    cdef u64 key
    cdef double dot
    with nogil:
        for k in range(n):
            i = order[k]
            if labels[i] >= 0:
                continue
            labels[i] = clusters
            clusters += 1
            if merges >= max_merges:
                continue
            for t in range(tables):
                key = query_codes[t, i]
                p = _lower_bound(sorted_codes[t], key)
                while p < n and sorted_codes[t, p] == key:
                    j = sorted_index[t, p]
                    p += 1
                    if labels[j] >= 0:
                        continue
                    dot = 0.0
                    for d in range(dim):
                        dot = dot + unit[i, d] * unit[j, d]
                    comparisons += 1
                    if dot >= threshold:
                        labels[j] = labels[i]
                        merges += 1
                        if merges >= max_merges:
                            break
                if merges >= max_merges:
                    break
    return labels_array, comparisons
