// Exact top-k by magnitude for K tensors at once: radix histogram select on the bits of |x|.
//
// The key of a value is its bit pattern without the sign, which orders like |x|. Levels take the
// top 15 key bits, then 16 bits at a time: fp16/bf16 keys (15 bits) need one 2^15-bin pass, fp32
// two passes, fp64 four. Each pass histograms, per chunk and model, the keys whose higher bits
// equal the prefix chosen so far; a scan from the top bin finds the bin of the k-th largest key.
// After the last pass the threshold key T is exact, and the per-chunk counts of keys equal to T
// give every chunk the number of ties before it, so `tie_index` (keep exactly k, lowest index
// first) needs no extra pass. Oracle: topk_magnitude_reference in fusion_engine/ops/magnitude_mask.py.
#pragma once
#include "kernel_common.h"

namespace fe {

struct Selection {
  enum Mode { none, all, greater, greater_equal, partial } mode = none;
  uint64_t threshold = 0;            // T, the key of the k-th largest magnitude
  int64_t ties_to_keep = 0;          // partial: how many keys == T survive (lowest index first)
  std::vector<int64_t> ties_before;  // partial: keys == T in the chunks before chunk p
  double l1_total = 0, l1_kept = 0;  // sum |x| over all / over kept entries (when asked)
};

// Per-chunk state of one model's keep rule while a chunk is walked in index order.
struct KeepRule {
  Selection::Mode mode;
  uint64_t threshold;
  int64_t ties_to_keep;
  int64_t ties_seen;  // keys == T met so far, counting earlier chunks

  KeepRule(const Selection& s, int chunk)
      : mode(s.mode), threshold(s.threshold), ties_to_keep(s.ties_to_keep),
        ties_seen(s.mode == Selection::partial ? s.ties_before[chunk] : 0) {}
};

// kept[j] = whether entry j of this block survives; blocks must come in index order.
template <class Key>
FE_SIMD void keep_block(const Key* keys, int64_t m, KeepRule& r, uint8_t* kept) {
  const Key t = static_cast<Key>(r.threshold);
  switch (r.mode) {
    case Selection::none: std::memset(kept, 0, m); return;
    case Selection::all: std::memset(kept, 1, m); return;
    case Selection::greater: for (int64_t j = 0; j < m; ++j) kept[j] = keys[j] > t; return;
    case Selection::greater_equal: for (int64_t j = 0; j < m; ++j) kept[j] = keys[j] >= t; return;
    case Selection::partial: break;
  }
  int64_t equal = 0;
  for (int64_t j = 0; j < m; ++j) equal += keys[j] == t;
  if (equal == 0 || r.ties_seen >= r.ties_to_keep) {
    for (int64_t j = 0; j < m; ++j) kept[j] = keys[j] > t;
  } else if (r.ties_seen + equal <= r.ties_to_keep) {
    for (int64_t j = 0; j < m; ++j) kept[j] = keys[j] >= t;
  } else {  // the block where the last kept tie falls: walk it in order
    int64_t seen = r.ties_seen;
    for (int64_t j = 0; j < m; ++j) {
      if (keys[j] == t) kept[j] = seen++ < r.ties_to_keep;
      else kept[j] = keys[j] > t;
    }
  }
  r.ties_seen += equal;
}

// Histogram one block of one model's keys at a level (prefix = chosen higher bits).
template <class T>
FE_SIMD void histogram_block(const typename Num<T>::key_t* keys, int64_t m, int shift, int width, uint64_t prefix,
                             bool first_level, uint32_t* hist, bool want_l1, bool last_level, double& above,
                             double& total) {
  using Key = typename Num<T>::key_t;
  const Key mask = (Key(1) << width) - 1;
  if (first_level) {
    for (int64_t j = 0; j < m; ++j) hist[keys[j] >> shift]++;
    if (want_l1) {
      typename Num<T>::acc s = 0;
      for (int64_t j = 0; j < m; ++j) s += Num<T>::from_key(keys[j]);
      total += s;
    }
    if (!last_level || !want_l1) return;
  } else {
    const Key pre = static_cast<Key>(prefix);
    for (int64_t j = 0; j < m; ++j)
      if ((keys[j] >> (shift + width)) == pre) hist[(keys[j] >> shift) & mask]++;
  }
  if (last_level && want_l1 && !first_level) {
    const Key pre = static_cast<Key>(prefix);
    typename Num<T>::acc s = 0;
    for (int64_t j = 0; j < m; ++j)
      s += (keys[j] >> (shift + width)) > pre ? Num<T>::from_key(keys[j]) : 0;
    above += s;
  }
}

// Select the k_i largest keys of each of K models. `fill(begin, m, keys, bad)` writes the keys of
// elements [begin, begin+m) of every model into keys[i * kBlock + j] and ORs non-finite inputs
// into `bad` (only asked on the first pass).
template <class T, class Fill>
std::vector<Selection> select_topk(int K, int64_t n, const int64_t* ks, bool tie_index, bool want_l1,
                                   const Chunking& ch, Fill&& fill, int& bad) {
  using Key = typename Num<T>::key_t;
  constexpr int key_bits = Num<T>::key_bits;
  std::vector<Selection> sel(K);
  std::vector<int64_t> need(K);
  std::vector<uint64_t> prefix(K, 0);
  std::vector<int> active;
  for (int i = 0; i < K; ++i) {
    if (ks[i] <= 0) sel[i].mode = Selection::none;
    else if (ks[i] >= n) sel[i].mode = Selection::all;
    else { active.push_back(i); need[i] = ks[i]; }
  }
  const bool l1_all = want_l1;  // kept == total for `all`; 0 for `none`
  const int parts = ch.parts;
  std::vector<double> above(size_t(parts) * K, 0.0), total(size_t(parts) * K, 0.0);
  std::vector<uint32_t> hist;
  int shift = key_bits - 15, width = 15;
  bool first = true;
  // Pass 0 also serves models that need no selection (for the non-finite check and L1 totals).
  while (true) {
    const bool last = shift == 0;
    const int bins = 1 << width;
    hist.assign(size_t(parts) * K * bins, 0u);
    int bad_pass = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(| : bad_pass)
    for (int p = 0; p < parts; ++p) {
      std::vector<Key> keys(size_t(K) * kBlock);
      for (int64_t begin = ch.begin(p); begin < ch.end(p); begin += kBlock) {
        const int64_t m = std::min(kBlock, ch.end(p) - begin);
        fill(begin, m, keys.data(), bad_pass);
        for (int i = 0; i < K; ++i) {
          const bool selecting = sel[i].mode == Selection::none && need[i] > 0;
          if (!selecting) {
            if (first && l1_all && sel[i].mode == Selection::all) {
              typename Num<T>::acc s = 0;
              for (int64_t j = 0; j < m; ++j) s += Num<T>::from_key(keys[size_t(i) * kBlock + j]);
              total[size_t(p) * K + i] += s;
            }
            continue;
          }
          histogram_block<T>(keys.data() + size_t(i) * kBlock, m, shift, width, prefix[i], first,
                             hist.data() + (size_t(p) * K + i) * bins, want_l1, last,
                             above[size_t(p) * K + i], total[size_t(p) * K + i]);
        }
      }
    }
    if (first) bad |= bad_pass;
    for (int i : active) {
      std::vector<uint64_t> counts(bins, 0);
      for (int p = 0; p < parts; ++p) {
        const uint32_t* h = hist.data() + (size_t(p) * K + i) * bins;
        for (int b = 0; b < bins; ++b) counts[b] += h[b];
      }
      int64_t above_count = 0;
      int chosen = 0;
      for (int b = bins - 1; b >= 0; --b) {
        if (above_count + int64_t(counts[b]) >= need[i]) { chosen = b; break; }
        above_count += counts[b];
      }
      need[i] -= above_count;
      const uint64_t level_prefix = prefix[i];
      prefix[i] = (prefix[i] << width) | uint64_t(chosen);
      if (!last) continue;
      Selection& s = sel[i];
      s.threshold = prefix[i];
      const int64_t ties = int64_t(counts[chosen]);
      if (!tie_index || need[i] == ties) {
        s.mode = Selection::greater_equal;
        s.ties_to_keep = ties;
      } else {
        s.mode = Selection::partial;
        s.ties_to_keep = need[i];
        s.ties_before.assign(parts, 0);
        int64_t run = 0;
        for (int p = 0; p < parts; ++p) {
          s.ties_before[p] = run;
          run += hist[(size_t(p) * K + i) * bins + chosen];
        }
      }
      if (want_l1) {
        double kept = 0;
        for (int p = 0; p < parts; ++p) kept += above[size_t(p) * K + i];
        for (int b = chosen + 1; b < bins; ++b)
          if (counts[b]) kept += double(counts[b]) * double(Num<T>::from_key(Key((level_prefix << width) | uint64_t(b))));
        kept += double(s.ties_to_keep) * double(Num<T>::from_key(Key(s.threshold)));
        s.l1_kept = kept;
      }
    }
    first = false;
    if (last) break;
    shift -= 16;
    width = 16;
    if (active.empty()) break;
  }
  for (int i = 0; i < K; ++i) {
    double t = 0;
    for (int p = 0; p < parts; ++p) t += total[size_t(p) * K + i];
    sel[i].l1_total = t;
    if (sel[i].mode == Selection::all) sel[i].l1_kept = t;
  }
  return sel;
}

}  // namespace fe
