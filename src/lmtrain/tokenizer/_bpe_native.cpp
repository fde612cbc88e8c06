// The merge loop of lmtrain.tokenizer.bpe_train.learn_merges in C++, step for step: the same linked
// list of symbols, pair counts, pair -> positions index and lazily updated max-heap, so the merges
// are identical (the tests compare both with a naive reference). Built at install time when a
// compiler is there; without it the Python version runs.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <queue>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using Key = uint64_t;  // a pair (a, b) as a << 32 | b: ordered like the tuple

inline Key pair_key(int64_t a, int64_t b) { return (static_cast<Key>(a) << 32) | static_cast<Key>(b); }

struct Entry {
    int64_t count;
    Key key;
};

// top() is the largest count, then the smallest pair
struct Lower {
    bool operator()(const Entry& x, const Entry& y) const {
        return x.count < y.count || (x.count == y.count && x.key > y.key);
    }
};

struct KeyHash {
    size_t operator()(Key k) const {  // splitmix64 finaliser
        k += 0x9e3779b97f4a7c15ULL;
        k = (k ^ (k >> 30)) * 0xbf58476d1ce4e5b9ULL;
        k = (k ^ (k >> 27)) * 0x94d049bb133111ebULL;
        return static_cast<size_t>(k ^ (k >> 31));
    }
};

PyObject* learn_merges(PyObject*, PyObject* args) {
    Py_buffer data, lengths, freqs;
    Py_ssize_t n_merges;
    if (!PyArg_ParseTuple(args, "y*y*y*n", &data, &lengths, &freqs, &n_merges)) return nullptr;
    const auto* bytes = static_cast<const unsigned char*>(data.buf);
    const auto* lens = static_cast<const int64_t*>(lengths.buf);
    const auto* weights = static_cast<const int64_t*>(freqs.buf);
    const Py_ssize_t n = data.len, n_chunks = lengths.len / static_cast<Py_ssize_t>(sizeof(int64_t));

    std::vector<int64_t> sym(n), weight(n);
    std::vector<int32_t> nxt(n), prv(n);
    Py_ssize_t pos = 0;
    for (Py_ssize_t c = 0; c < n_chunks; ++c) {
        for (int64_t t = 0; t < lens[c]; ++t, ++pos) {
            sym[pos] = bytes[pos];
            weight[pos] = weights[c];
            nxt[pos] = t + 1 < lens[c] ? static_cast<int32_t>(pos + 1) : -1;
            prv[pos] = t > 0 ? static_cast<int32_t>(pos - 1) : -1;
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&freqs);

    std::unordered_map<Key, int64_t, KeyHash> counts;
    std::unordered_map<Key, std::vector<int32_t>, KeyHash> where;
    counts.reserve(1 << 16);
    where.reserve(1 << 16);
    for (Py_ssize_t i = 0; i < n; ++i) {
        if (nxt[i] != -1) {
            Key k = pair_key(sym[i], sym[nxt[i]]);
            counts[k] += weight[i];
            where[k].push_back(static_cast<int32_t>(i));
        }
    }
    std::priority_queue<Entry, std::vector<Entry>, Lower> heap;
    for (const auto& [k, c] : counts)
        if (c > 1) heap.push({c, k});

    std::vector<std::pair<int64_t, int64_t>> merges;
    std::vector<Key> grown;
    while (!heap.empty() && static_cast<Py_ssize_t>(merges.size()) < n_merges) {
        Entry top = heap.top();
        heap.pop();
        auto found = counts.find(top.key);
        int64_t count = found == counts.end() ? 0 : found->second;
        if (count != top.count) {
            if (count < top.count && count > 1) heap.push({count, top.key});
            continue;  // stale entry (see learn_merges in bpe_train.py)
        }
        const int64_t a = static_cast<int64_t>(top.key >> 32), b = static_cast<int64_t>(top.key & 0xffffffffULL);
        const int64_t made = 256 + static_cast<int64_t>(merges.size());
        merges.emplace_back(a, b);
        std::vector<int32_t> positions = std::move(where[top.key]);
        where.erase(top.key);
        if (a == b) std::sort(positions.begin(), positions.end());
        grown.clear();
        for (int32_t i : positions) {
            int32_t j = nxt[i];
            if (sym[i] != a || j == -1 || sym[j] != b) continue;
            const int64_t f = weight[i];
            const int32_t h = prv[i], k = nxt[j];
            if (h != -1) {
                counts[pair_key(sym[h], a)] -= f;
                Key joined = pair_key(sym[h], made);
                counts[joined] += f;
                where[joined].push_back(h);
                grown.push_back(joined);
            }
            if (k != -1) {
                counts[pair_key(b, sym[k])] -= f;
                Key joined = pair_key(made, sym[k]);
                counts[joined] += f;
                where[joined].push_back(i);
                grown.push_back(joined);
                prv[k] = i;
            }
            sym[i] = made;
            sym[j] = -1;
            nxt[i] = k;
        }
        counts.erase(top.key);
        std::sort(grown.begin(), grown.end());
        grown.erase(std::unique(grown.begin(), grown.end()), grown.end());
        for (Key k : grown) {
            int64_t c = counts[k];
            if (c > 1) heap.push({c, k});
        }
    }

    PyObject* out = PyList_New(static_cast<Py_ssize_t>(merges.size()));
    if (out == nullptr) return nullptr;
    for (size_t m = 0; m < merges.size(); ++m) {
        PyObject* item = Py_BuildValue("(LL)", static_cast<long long>(merges[m].first),
                                       static_cast<long long>(merges[m].second));
        if (item == nullptr) {
            Py_DECREF(out);
            return nullptr;
        }
        PyList_SET_ITEM(out, static_cast<Py_ssize_t>(m), item);
    }
    return out;
}

PyMethodDef methods[] = {
    {"learn_merges", learn_merges, METH_VARARGS,
     "learn_merges(data: bytes, lengths: int64 buffer, freqs: int64 buffer, n_merges) -> [(a, b)]"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bpe_native", "The BPE merge loop in C++.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__bpe_native(void) { return PyModule_Create(&module); }
