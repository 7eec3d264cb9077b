// Exact top-k by magnitude for K tensors at once: radix histogram select on the bits of |x|.
//
// The key of a value is its bit pattern without the sign, which orders like |x|. Levels take the
// top 15 key bits, then 16 bits at a time: fp16/bf16 keys (15 bits) need one 2^15-bin pass, fp32
// two passes, fp64 four. Each pass histograms, per chunk and model, the keys whose higher bits
// equal the prefix chosen so far; a scan from the top bin finds the bin of the k-th largest key.
// After the last pass the threshold key T is exact, and the per-chunk counts of keys equal to T
// give every chunk the number of ties before it, so `tie_index` (keep exactly k, lowest index
// first) needs no extra pass.
//
// Large tensors first try a sampled window: the keys of up to 64K sampled entries bracket T in
// [lo, hi]; one pass then only counts the keys above hi (vectorised) and collects the few keys
// inside the window, and the same radix select runs on those in memory. A model whose window
// misses T (count above hi >= k, or count at least lo < k) falls back to the full histogram
// passes, so the result is exact either way; fp32 then needs two passes over the data, not three.
// Oracle: topk_magnitude_reference in fusion_engine/ops/magnitude_mask.py.
#pragma once
#include "kernel_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FE_HAVE_AVX512_COMPRESS 1
#endif

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


// Histogram one block of one model's keys at a level (prefix = chosen higher bits). `hist` has
// kZeroSlots extra counters after its bins: zero keys (unchanged weights, often a large share)
// rotate over them instead of all hitting bin 0, which would chain every increment through
// store-to-load forwarding. add_zero_slots folds them back into bin 0.
constexpr int kZeroSlots = 8;

template <class T>
FE_SIMD void histogram_block(const typename Num<T>::key_t* keys, int64_t m, int shift, int width, uint64_t prefix,
                             bool first_level, uint32_t* hist) {
  using Key = typename Num<T>::key_t;
  const Key mask = (Key(1) << width) - 1;
  const uint32_t zero_slot = uint32_t(1) << width;
  if (first_level) {
    for (int64_t j = 0; j < m; ++j) {
      const Key k = keys[j];
      hist[k ? uint32_t(k >> shift) : zero_slot + uint32_t(j & (kZeroSlots - 1))]++;
    }
  } else {
    const Key pre = static_cast<Key>(prefix);
    for (int64_t j = 0; j < m; ++j) {
      const Key k = keys[j];
      if ((k >> (shift + width)) == pre) hist[k ? uint32_t((k >> shift) & mask) : zero_slot + uint32_t(j & (kZeroSlots - 1))]++;
    }
  }
}

inline void add_zero_slots(uint32_t* hist, int bins) {
  for (int z = 0; z < kZeroSlots; ++z) { hist[0] += hist[bins + z]; hist[bins + z] = 0; }
}

// Sum of |x| over a block, and over the keys strictly above `above` (L1 norms for rescaling).
template <class T>
FE_SIMD void l1_block(const typename Num<T>::key_t* keys, int64_t m, typename Num<T>::key_t above, double& total,
                      double& over) {
  typename Num<T>::acc t = 0, o = 0;
  for (int64_t j = 0; j < m; ++j) {
    const auto v = Num<T>::from_key(keys[j]);
    t += v;
    o += keys[j] > above ? v : decltype(v)(0);
  }
  total += t;
  over += o;
}

// Keys collected in index order; grows by whole blocks so appends need no capacity checks.
template <class Key>
struct CandidateList {
  std::vector<Key> keys;
  size_t size = 0;
  Key* room_for(int64_t m) {  // space for m more keys at the end
    if (keys.size() < size + size_t(m)) keys.resize(std::max(keys.size() * 2, size + size_t(m)));
    return keys.data() + size;
  }
  const Key* begin() const { return keys.data(); }
  const Key* end() const { return keys.data() + size; }
};

// Count the keys above hi; append the keys in [lo, hi] to `out`, in index order.
template <class Key>
FE_SIMD void window_block_generic(const Key* keys, int64_t m, Key lo, Key hi, int64_t& above, CandidateList<Key>& out) {
  uint8_t inside[kBlock];
  const Key span = hi - lo;
  int64_t count = 0;
  for (int64_t j = 0; j < m; ++j) {
    inside[j] = Key(keys[j] - lo) <= span;
    count += keys[j] > hi;
  }
  above += count;
  Key* dst = out.room_for(m);
  int64_t n = 0, j = 0;
  for (; j + 8 <= m; j += 8) {  // most groups of 8 hold no candidate: one test skips them
    uint64_t flags;
    std::memcpy(&flags, inside + j, 8);
    if (!flags) continue;
    for (int t = 0; t < 8; ++t) {  // branch-free append
      dst[n] = keys[j + t];
      n += inside[j + t];
    }
  }
  for (; j < m; ++j) {
    dst[n] = keys[j];
    n += inside[j];
  }
  out.size += size_t(n);
}

#ifdef FE_HAVE_AVX512_COMPRESS
// window_block for 32-bit keys with AVX-512: compare 16 keys, vpcompressd the ones in the window
// into a register and store it whole (the list keeps 16 keys of slack), no branches.
__attribute__((target("avx512f"))) inline void window_block_avx512(const uint32_t* keys, int64_t m, uint32_t lo,
                                                                   uint32_t hi, int64_t& above,
                                                                   CandidateList<uint32_t>& out) {
  uint32_t* dst = out.room_for(m + 16);
  const __m512i vlo = _mm512_set1_epi32(int(lo)), vspan = _mm512_set1_epi32(int(hi - lo));
  const __m512i vhi = _mm512_set1_epi32(int(hi));
  int64_t n = 0, count = 0, j = 0;
  for (; j + 16 <= m; j += 16) {
    const __m512i k = _mm512_loadu_si512(keys + j);
    const __mmask16 inside = _mm512_cmple_epu32_mask(_mm512_sub_epi32(k, vlo), vspan);
    count += __builtin_popcount(_mm512_cmpgt_epu32_mask(k, vhi));
    _mm512_storeu_si512(dst + n, _mm512_maskz_compress_epi32(inside, k));
    n += __builtin_popcount(inside);
  }
  for (; j < m; ++j) {
    dst[n] = keys[j];
    n += uint32_t(keys[j] - lo) <= hi - lo;
    count += keys[j] > hi;
  }
  above += count;
  out.size += size_t(n);
}
#endif

template <class Key>
inline void window_block(const Key* keys, int64_t m, Key lo, Key hi, int64_t& above, CandidateList<Key>& out) {
#ifdef FE_HAVE_AVX512_COMPRESS
  if constexpr (std::is_same_v<Key, uint32_t>) {
    static const bool avx512 = __builtin_cpu_supports("avx512f");
    if (avx512) return window_block_avx512(keys, m, lo, hi, above, out);
  }
#endif
  window_block_generic(keys, m, lo, hi, above, out);
}

namespace select_detail {

constexpr int64_t kWindowMinN = int64_t(1) << 18;  // smaller tensors: plain histogram passes
constexpr int kSampleRun = 512;                      // sampled entries come in runs of 512
inline int sample_runs(int64_t n) {                   // 1/64 of the tensor, 16 to 128 runs
  return int(std::clamp<int64_t>(n / (64 * kSampleRun), 16, 128));
}
constexpr double kMaxInsideFraction = 0.05;          // wider windows: plain histogram passes

// The bin holding the need-th largest key, scanning from the top; need becomes its rank in it.
inline int choose_bin(const uint64_t* counts, int bins, int64_t& need) {
  int64_t above = 0;
  for (int b = bins - 1; b >= 0; --b) {
    if (above + int64_t(counts[b]) >= need) { need -= above; return b; }
    above += int64_t(counts[b]);
  }
  need -= above;
  return 0;
}

// Threshold, mode and per-chunk ties of a model once T and its tie counts are known.
inline void finish(Selection& s, uint64_t threshold, int64_t ties_total, int64_t ties_keep, bool tie_index,
                   const std::vector<int64_t>& ties_per_chunk) {
  s.threshold = threshold;
  if (!tie_index || ties_keep == ties_total) {
    s.mode = Selection::greater_equal;
    s.ties_to_keep = ties_total;
    return;
  }
  s.mode = Selection::partial;
  s.ties_to_keep = ties_keep;
  s.ties_before.assign(ties_per_chunk.size(), 0);
  int64_t run = 0;
  for (size_t p = 0; p < ties_per_chunk.size(); ++p) { s.ties_before[p] = run; run += ties_per_chunk[p]; }
}

// The need-th largest of keys held in memory (candidate lists), by the same radix levels.
// On return `need` is how many keys equal to the result rank within the selection.
template <class T>
typename Num<T>::key_t kth_largest(const std::vector<const CandidateList<typename Num<T>::key_t>*>& lists,
                                    int64_t& need, int64_t& ties_total) {
  using Key = typename Num<T>::key_t;
  uint64_t prefix = 0;
  std::vector<uint64_t> counts;
  for (int shift = Num<T>::key_bits - 15, width = 15;; shift -= 16, width = 16) {
    const int bins = 1 << width;
    const Key mask = Key(bins - 1);
    const bool first = shift == Num<T>::key_bits - 15;
    counts.assign(bins, 0);
    for (const auto* list : lists)
      for (Key k : *list)
        if (first || (k >> (shift + width)) == Key(prefix)) counts[(k >> shift) & mask]++;
    const int chosen = choose_bin(counts.data(), bins, need);
    prefix = (prefix << width) | uint64_t(chosen);
    if (shift == 0) { ties_total = int64_t(counts[chosen]); return Key(prefix); }
  }
}

// The window [lo, hi] of keys that brackets the k-th largest with high probability, from the
// sampled keys of one model (4.5 standard deviations of the sample quantile plus a margin;
// a miss only costs the fallback pass).
template <class Key>
bool window_from_sample(std::vector<Key>& sample, int64_t k, int64_t n, Key& lo, Key& hi) {
  const double S = double(sample.size()), q = double(k) / double(n);
  const double margin = 4.5 * std::sqrt(S * q * (1.0 - q)) + 0.001 * S + 16.0;
  const double rank = q * S;  // expected rank of T among the sample, from the top
  const int64_t hi_rank = int64_t(std::floor(rank - margin)), lo_rank = int64_t(std::ceil(rank + margin));
  if (hi_rank < 0 && lo_rank >= int64_t(S)) return false;  // the window would be everything
  auto nth = [&](int64_t r) {  // r-th largest (0-based)
    std::nth_element(sample.begin(), sample.begin() + r, sample.end(), std::greater<Key>());
    return sample[r];
  };
  hi = hi_rank < 0 ? std::numeric_limits<Key>::max() : nth(hi_rank);
  lo = lo_rank >= int64_t(S) ? Key(0) : nth(lo_rank);
  // Heavily tied keys (e.g. bf16 task vectors) can put most entries inside the window: then
  // collecting them costs more than one histogram pass.
  int64_t inside = 0;
  for (Key k : sample) inside += Key(k - lo) <= Key(hi - lo);
  return double(inside) <= kMaxInsideFraction * S;
}

}  // namespace select_detail

// Select the k_i largest keys of each of K models. `fill(begin, m, keys, bad)` writes the keys of
// elements [begin, begin+m) of every model into keys[i * kBlock + j] and ORs non-finite inputs
// into `bad`. With want_l1, l1_total and l1_kept are filled too.
template <class T, class Fill>
std::vector<Selection> select_topk(int K, int64_t n, const int64_t* ks, bool tie_index, bool want_l1,
                                   const Chunking& ch, Fill&& fill, int& bad) {
  using Key = typename Num<T>::key_t;
  namespace sd = select_detail;
  const int parts = ch.parts;
  std::vector<Selection> sel(K);
  std::vector<int> pending;  // models whose threshold is still unknown
  for (int i = 0; i < K; ++i) {
    if (ks[i] <= 0) sel[i].mode = Selection::none;
    else if (ks[i] >= n) sel[i].mode = Selection::all;
    else pending.push_back(i);
  }
  std::vector<double> total(size_t(parts) * K, 0.0), above_l1(size_t(parts) * K, 0.0);
  auto at = [&](int p, int i) { return size_t(p) * K + i; };
  bool first_pass_done = false;

  // 1. The sampled window pass.
  std::vector<char> windowed(K, 0);
  std::vector<Key> lo(K), hi(K, std::numeric_limits<Key>::max());
  if (n >= sd::kWindowMinN && !pending.empty()) {
    std::vector<std::vector<Key>> sample(K);
    std::vector<Key> keys(size_t(K) * kBlock);
    int unused = 0;
    const int runs = sd::sample_runs(n);
    for (int r = 0; r < runs; ++r) {
      const int64_t begin = (n - sd::kSampleRun) * r / (runs - 1);
      fill(begin, sd::kSampleRun, keys.data(), unused);
      for (int i : pending) sample[i].insert(sample[i].end(), &keys[size_t(i) * kBlock], &keys[size_t(i) * kBlock] + sd::kSampleRun);
    }
    for (int i : pending) windowed[i] = sd::window_from_sample(sample[i], ks[i], n, lo[i], hi[i]);
    std::vector<CandidateList<Key>> candidates(size_t(parts) * K);
    std::vector<int64_t> above(size_t(parts) * K, 0);
    int bad_pass = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(| : bad_pass)
    for (int p = 0; p < parts; ++p) {
      std::vector<Key> block_keys(size_t(K) * kBlock);
      for (int i = 0; i < K; ++i)
        if (windowed[i]) candidates[at(p, i)].keys.resize(size_t((ch.end(p) - ch.begin(p)) / 16 + kBlock));
      for (int64_t begin = ch.begin(p); begin < ch.end(p); begin += kBlock) {
        const int64_t m = std::min(kBlock, ch.end(p) - begin);
        fill(begin, m, block_keys.data(), bad_pass);
        for (int i = 0; i < K; ++i) {
          const Key* k = block_keys.data() + size_t(i) * kBlock;
          if (windowed[i]) window_block(k, m, lo[i], hi[i], above[at(p, i)], candidates[at(p, i)]);
          if (want_l1) l1_block<T>(k, m, hi[i], total[at(p, i)], above_l1[at(p, i)]);
        }
      }
    }
    bad |= bad_pass;
    first_pass_done = true;
    std::vector<int> still_pending;
    for (int i : pending) {
      int64_t above_count = 0, inside = 0;
      std::vector<const CandidateList<Key>*> lists;
      for (int p = 0; p < parts; ++p) {
        above_count += above[at(p, i)];
        inside += int64_t(candidates[at(p, i)].size);
        lists.push_back(&candidates[at(p, i)]);
      }
      if (!windowed[i] || !(above_count < ks[i] && ks[i] <= above_count + inside)) {
        still_pending.push_back(i);  // the sample missed: full histogram passes
        continue;
      }
      int64_t need = ks[i] - above_count, ties_total = 0;
      const Key t = sd::kth_largest<T>(lists, need, ties_total);
      std::vector<int64_t> ties(parts, 0);
      double kept_l1 = 0;
      for (int p = 0; p < parts; ++p) {
        for (Key k : candidates[at(p, i)]) {
          ties[p] += k == t;
          if (want_l1 && k > t) kept_l1 += double(Num<T>::from_key(k));
        }
        kept_l1 += above_l1[at(p, i)];
      }
      sd::finish(sel[i], t, ties_total, need, tie_index, ties);
      sel[i].l1_kept = kept_l1 + double(sel[i].ties_to_keep) * double(Num<T>::from_key(t));
    }
    pending.swap(still_pending);
  }

  // 2. Histogram passes (small tensors, and models whose window missed).
  std::vector<int64_t> need(K, 0);
  std::vector<uint64_t> prefix(K, 0);
  for (int i : pending) need[i] = ks[i];
  std::vector<uint32_t> hist;
  for (int shift = Num<T>::key_bits - 15, width = 15; !pending.empty() || !first_pass_done; shift -= 16, width = 16) {
    const bool first = shift == Num<T>::key_bits - 15;
    const bool count_totals = !first_pass_done;
    const int bins = 1 << width;
    const size_t stride = size_t(bins) + kZeroSlots;  // per (chunk, model): bins + zero slots
    hist.assign(size_t(parts) * K * stride, 0u);
    std::fill(above_l1.begin(), above_l1.end(), 0.0);
    std::vector<char> selecting(K, 0);
    for (int i : pending) selecting[i] = 1;
    int bad_pass = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(| : bad_pass)
    for (int p = 0; p < parts; ++p) {
      std::vector<Key> keys(size_t(K) * kBlock);
      for (int64_t begin = ch.begin(p); begin < ch.end(p); begin += kBlock) {
        const int64_t m = std::min(kBlock, ch.end(p) - begin);
        fill(begin, m, keys.data(), bad_pass);
        for (int i = 0; i < K; ++i) {
          const Key* k = keys.data() + size_t(i) * kBlock;
          if (selecting[i])
            histogram_block<T>(k, m, shift, width, prefix[i], first, hist.data() + at(p, i) * stride);
          if (want_l1 && (count_totals || (selecting[i] && shift == 0))) {
            // totals on the first pass; on the last, the L1 of keys above the chosen prefix
            const Key above_key = shift == 0 && !first ? Key(((prefix[i] + 1) << (shift + width)) - 1)
                                                        : std::numeric_limits<Key>::max();
            double unused_total = 0;
            l1_block<T>(k, m, above_key, count_totals ? total[at(p, i)] : unused_total, above_l1[at(p, i)]);
          }
        }
      }
    }
    if (!first_pass_done) bad |= bad_pass;
    first_pass_done = true;
    std::vector<int> still_pending;
    for (int i : pending) {
      std::vector<uint64_t> counts(bins, 0);
      for (int p = 0; p < parts; ++p) {
        uint32_t* h = hist.data() + at(p, i) * stride;
        add_zero_slots(h, bins);
        for (int b = 0; b < bins; ++b) counts[b] += h[b];
      }
      const uint64_t level_prefix = prefix[i];
      const int chosen = sd::choose_bin(counts.data(), bins, need[i]);
      prefix[i] = (prefix[i] << width) | uint64_t(chosen);
      if (shift != 0) { still_pending.push_back(i); continue; }
      std::vector<int64_t> ties(parts);
      for (int p = 0; p < parts; ++p) ties[p] = hist[at(p, i) * stride + chosen];
      sd::finish(sel[i], prefix[i], int64_t(counts[chosen]), need[i], tie_index, ties);
      if (want_l1) {
        double kept = 0;
        if (!first) for (int p = 0; p < parts; ++p) kept += above_l1[at(p, i)];
        for (int b = chosen + 1; b < bins; ++b)
          if (counts[b]) kept += double(counts[b]) * double(Num<T>::from_key(Key((level_prefix << width) | uint64_t(b))));
        sel[i].l1_kept = kept + double(sel[i].ties_to_keep) * double(Num<T>::from_key(Key(prefix[i])));
      }
    }
    pending.swap(still_pending);
    if (shift == 0) break;
  }
  for (int i = 0; i < K; ++i) {
    double t = 0;
    for (int p = 0; p < parts; ++p) t += total[at(p, i)];
    sel[i].l1_total = t;
    if (sel[i].mode == Selection::all) sel[i].l1_kept = t;
  }
  return sel;
}

}  // namespace fe
